//! Restarts of real `drl node` processes over real QUIC: the faults of the
//! restart issue, replayed with `kill -9`, `SIGSTOP` and `SIGCONT`. A key's
//! limit is spent before each fault, then the key is hammered through every
//! node; what is admitted beyond the spent limit must stay within the
//! in-flight bound (`Q = max(n, ⌈0.02·L⌉)`, the crashed node's
//! unacknowledged share at most).

mod support;

use std::time::{Duration, Instant};

use support::procs::{check, inflight_bound, ProcCluster, LIMIT, RULES};
use support::{free_port, request as admin, signal, status as http};

/// The body of a GET.
fn http_body(port: u16, path: &str) -> String {
    admin(port, "GET", path, "")
        .map(|(_, t)| t)
        .unwrap_or_default()
}

fn three_nodes(name: &str, snapshot_interval: Option<&'static str>) -> ProcCluster {
    let mut c = ProcCluster::new(name, 3, snapshot_interval, RULES);
    for slot in 0..3 {
        c.start(slot);
    }
    c.wait_ready(&[0, 1, 2], Duration::from_secs(30));
    c
}

/// Spends the rest of the limit of `user` (of which `already` is spent)
/// through node 0 (it stops short by the shares it reserves for its peers),
/// waits for the acknowledgements, and returns the total spent.
fn spend_limit_on_node_0(c: &ProcCluster, user: &str, already: u64) -> u64 {
    let rest = LIMIT - already;
    let spent = already + c.spend(0, user, rest, Duration::from_secs(30));
    assert!(
        spent + inflight_bound(3) >= LIMIT && spent <= LIMIT,
        "spent {spent}"
    );
    std::thread::sleep(Duration::from_millis(300));
    spent
}

#[test]
fn killing_the_seed_without_a_snapshot_resets_no_quota() {
    let mut c = three_nodes("nosnap", None);
    let spent = spend_limit_on_node_0(&c, "alice", 0);
    c.kill9(0);
    c.start(0);
    let ready_after = c.wait_ready(&[0], Duration::from_secs(20));
    let after = c.hammer(&[0, 1, 2], "alice", Duration::from_secs(3));
    eprintln!("no snapshot: ready {ready_after:?} after restart; {after} admitted after, {spent} spent before");
    assert!(
        spent + after <= LIMIT + inflight_bound(3),
        "{spent} + {after} admitted against a limit of {LIMIT}"
    );
}

#[test]
fn killing_the_seed_with_an_old_snapshot_resets_no_quota() {
    let mut c = three_nodes("snap", Some("400ms"));
    let first = c.spend(0, "bob", 100, Duration::from_secs(30));
    assert_eq!(first, 100);
    // A snapshot with the first 100 is written; the rest is newer.
    std::thread::sleep(Duration::from_millis(1000));
    let spent = spend_limit_on_node_0(&c, "bob", first);
    c.kill9(0);
    assert!(c.dir.join("data/node-0.snapshot").exists());
    c.start(0);
    c.wait_ready(&[0], Duration::from_secs(20));
    let after = c.hammer(&[0, 1, 2], "bob", Duration::from_secs(3));
    eprintln!("old snapshot: {after} admitted after the restart, {spent} spent before");
    assert!(
        spent + after <= LIMIT + inflight_bound(3),
        "{spent} + {after} admitted against a limit of {LIMIT}"
    );
}

#[test]
fn a_seed_killed_while_its_peers_are_stopped_admits_nothing_until_they_resume() {
    let mut c = three_nodes("stopped", None);
    let spent = spend_limit_on_node_0(&c, "carol", 0);
    signal(c.child(1).id(), "-STOP");
    signal(c.child(2).id(), "-STOP");
    c.kill9(0);
    c.start(0);
    // Far longer than the recovery timeout (1 s): time alone opens nothing.
    let during = c.hammer(&[0], "carol", Duration::from_secs(4));
    assert_eq!(during, 0, "admitted while every peer was stopped");
    assert!(!c.ready(0), "ready with no peer heard");
    signal(c.child(1).id(), "-CONT");
    signal(c.child(2).id(), "-CONT");
    c.wait_ready(&[0], Duration::from_secs(30));
    let after = c.hammer(&[0, 1, 2], "carol", Duration::from_secs(3));
    eprintln!(
        "peers stopped: {during} admitted while stopped, {after} after, {spent} spent before"
    );
    assert!(
        spent + after <= LIMIT + inflight_bound(3),
        "{spent} + {after} admitted against a limit of {LIMIT}"
    );
}

#[test]
fn a_joining_node_that_never_heard_a_member_admits_nothing() {
    let mut c = ProcCluster::new("alone", 3, None, RULES);
    // Node 1, new (no member list kept), seeded with ports where nobody
    // listens: only slot 0 may start a cluster of its own.
    let nobody = [free_port(), free_port()];
    c.start_with_seeds(1, &nobody);
    let start = Instant::now();
    while http(c.http[1], "GET", "/healthz", "") != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(20), "node not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Three times the recovery timeout (1 s).
    let admitted = c.hammer(&[1], "dave", Duration::from_secs(3));
    eprintln!("never heard a member: {admitted} admitted in 3 s");
    assert_eq!(admitted, 0, "a joining node decided as if alone");
    assert!(!c.ready(1));
    assert_eq!(check(c.http[1], "dave"), Some(503));
}

#[test]
fn a_snapshot_with_one_flipped_byte_is_moved_aside_and_the_node_recovers_from_peers() {
    let mut c = three_nodes("corrupt", Some("300ms"));
    let spent = spend_limit_on_node_0(&c, "erin", 0);
    // Let a snapshot with every hit be written, then crash.
    std::thread::sleep(Duration::from_millis(800));
    c.kill9(0);
    let path = c.dir.join("data/node-0.snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    c.start(0);
    c.wait_ready(&[0], Duration::from_secs(20));
    let aside: Vec<String> = std::fs::read_dir(c.dir.join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("node-0.snapshot.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "moved aside: {aside:?}");
    let metrics = http_body(c.http[0], "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("snapshots_refused") && l.ends_with(" 1")),
        "metric: {metrics}"
    );
    let after = c.hammer(&[0, 1, 2], "erin", Duration::from_secs(2));
    eprintln!("corrupt snapshot: {after} admitted after the restart, {spent} spent before");
    assert!(
        spent + after <= LIMIT + inflight_bound(3),
        "{spent} + {after} admitted against a limit of {LIMIT}"
    );
}

const NEW_RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1h" } ]
"#;

/// Waits until node `slot` runs `NEW_RULES` (its admin API says so).
fn wait_new_rules(c: &ProcCluster, slot: usize) {
    let start = Instant::now();
    while !http_body(c.http[slot], "/v1/rules").contains("limit = 5") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node {slot} never ran the new rules"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many of `n` requests for `user` node `slot` admits.
fn admitted_of(c: &ProcCluster, slot: usize, user: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| check(c.http[slot], user) == Some(200))
        .count()
}

#[test]
fn rules_put_through_the_admin_api_survive_a_kill_9_of_every_node() {
    let mut c = three_nodes("rules-kept", None);
    let (code, text) = admin(c.http[0], "PUT", "/v1/rules", NEW_RULES).unwrap();
    assert_eq!(code, 200, "{text}");
    for slot in 0..3 {
        wait_new_rules(&c, slot);
    }
    for slot in 0..3 {
        c.kill9(slot);
    }
    // Node 0 alone, from its own configuration (whose rules file still
    // holds the old rules): it runs the kept rules, even before it is ready.
    c.start(0);
    wait_new_rules(&c, 0);
    assert!(!c.ready(0));
    c.start(1);
    c.start(2);
    c.wait_ready(&[0, 1, 2], Duration::from_secs(30));
    for slot in 0..3 {
        assert!(http_body(c.http[slot], "/v1/rules").contains("limit = 5"));
    }
    let admitted = admitted_of(&c, 0, "frank", 20);
    assert!(admitted <= 5, "{admitted} admitted under a limit of 5");
}

#[test]
fn a_node_that_missed_a_rule_change_adopts_it_before_it_is_ready() {
    let mut c = three_nodes("rules-missed", None);
    c.kill9(0);
    let (code, text) = admin(c.http[1], "PUT", "/v1/rules", NEW_RULES).unwrap();
    assert_eq!(code, 200, "{text}");
    wait_new_rules(&c, 2);
    c.start(0);
    c.wait_ready(&[0], Duration::from_secs(20));
    // Ready means the peers' rules are in force: the very first requests are
    // decided by the new limit of 5 (a 300 under the old rules).
    let admitted = admitted_of(&c, 0, "gina", 20);
    assert!(admitted <= 5, "{admitted} admitted under a limit of 5");
    assert!(http_body(c.http[0], "/v1/rules").contains("limit = 5"));
}

#[test]
fn a_restarted_node_with_live_peers_is_ready_within_seconds() {
    // The time from a kill -9 and restart to `/readyz` 200, over ten
    // restarts of each node in turn; printed with `--nocapture`.
    let mut c = three_nodes("ready-time", None);
    let mut times = Vec::new();
    for round in 0..12 {
        let slot = round % 3;
        c.kill9(slot);
        c.start(slot);
        times.push(c.wait_ready(&[slot], Duration::from_secs(20)));
        c.wait_ready(&[0, 1, 2], Duration::from_secs(20));
    }
    times.sort();
    eprintln!(
        "ready after restart: min {:?}, median {:?}, max (p99 of {}) {:?}",
        times[0],
        times[times.len() / 2],
        times.len(),
        times[times.len() - 1]
    );
    assert!(times[times.len() - 1] < Duration::from_secs(10));
}
