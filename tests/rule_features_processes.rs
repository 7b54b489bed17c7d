//! The rule features and the counter API on real processes (`drl
//! cluster`, three nodes): a rule in shadow mode reports and never
//! denies, an unlimited rule exempts what it matches, a per-customer
//! override gives exactly its own quota through every node, and a counter
//! reset clears a key on every node, including one that was cut off during
//! the reset (stopped with SIGSTOP), without the old count ever coming back.

mod support;

use std::time::{Duration, Instant};

use support::cluster::LocalCluster;
use support::{request, signal, Resume};

const RULES: &str = r#"
[[rules]]
name = "trial"
shadow_mode = true
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 2, window = "1m" } ]

[[rules]]
name = "internal"
match = { service = "billing" }
unlimited = true

[[rules]]
name = "per-customer"
match = { customer = "*" }
limits = [ { algorithm = "fixed_window", limit = 3, window = "1h" } ]

[[rules.overrides]]
match = { customer = "gold" }
limits = [ { algorithm = "fixed_window", limit = 6, window = "1h" } ]

[[rules]]
name = "everyone"
match = {}
limits = [ { algorithm = "fixed_window", limit = 1000, window = "1h" } ]
"#;

fn check(port: u16, body: &str) -> (u16, String) {
    request(port, "POST", "/v1/check", body).expect("the node answers")
}

/// Admitted of `n` checks spread round-robin over the three nodes.
fn admitted(c: &LocalCluster, body: &str, n: usize) -> usize {
    (0..n)
        .filter(|i| check(c.http + (*i % 3) as u16, body).0 == 200)
        .count()
}

/// `(count, per-slot counts)` of the `per-customer` counter of `customer`
/// as node `port` sees it.
fn counter(port: u16, customer: &str) -> (u64, Vec<(u64, i64)>) {
    let body = format!(r#"{{"customer":"{customer}"}}"#);
    let (code, text) = request(port, "POST", "/v1/counters", &body).unwrap();
    assert_eq!(code, 200, "{text}");
    let json: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let c = json["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["rule"] == "per-customer")
        .unwrap_or_else(|| panic!("no per-customer counter in {json}"));
    let slots = c["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["slot"].as_u64().unwrap(), s["count"].as_i64().unwrap()))
        .collect();
    (c["count"].as_u64().unwrap(), slots)
}

/// Waits until every node sees `count` for the customer.
fn converge(c: &LocalCluster, customer: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in c.http..c.http + 3 {
        loop {
            let (got, slots) = counter(port, customer);
            if got == count {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node on {port} sees {got} ({slots:?}), not {count}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn shadow_unlimited_and_overrides_hold_on_every_node() {
    let c = LocalCluster::start("rule-features");
    c.put_rules(RULES, "per-customer");

    // Shadow mode: never a 429 from it; the third request on reports it.
    let mut reported = 0;
    for i in 0..5 {
        let (code, text) = check(c.http, r#"{"user":"ann"}"#);
        assert_eq!(code, 200, "request {i}: {text}");
        let head = text.to_ascii_lowercase();
        if head.contains("x-drl-shadow-denied") {
            assert!(text.contains(r#""shadow":{"rule":"trial""#), "{text}");
            reported += 1;
        }
    }
    assert_eq!(reported, 3, "requests 3 to 5 would have been denied");
    let metrics = request(c.http, "GET", "/metrics", "").unwrap().1;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("drl_shadow_denials_total") && l.contains("trial"))
        .unwrap_or_else(|| panic!("no shadow denial metric:\n{metrics}"));
    assert!(line.ends_with(" 3"), "{line}");

    // Unlimited: exempt from every limit, counted nowhere.
    assert_eq!(admitted(&c, r#"{"service":"billing"}"#, 30), 30);
    let (code, text) = request(c.http, "POST", "/v1/counters", r#"{"service":"billing"}"#).unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with(r#"{"counters":[]}"#), "{text}");

    // Overrides: exactly 3 for a customer, 6 for gold, through all nodes.
    assert_eq!(admitted(&c, r#"{"customer":"acme"}"#, 12), 3);
    assert_eq!(admitted(&c, r#"{"customer":"gold"}"#, 18), 6);
}

#[test]
fn a_reset_reaches_a_node_cut_off_during_it_and_stays() {
    let c = LocalCluster::start("counter-reset");
    c.put_rules(RULES, "per-customer");
    // One hit through each node: the limit of 3 is spent.
    for slot in 0..3u16 {
        assert_eq!(check(c.http + slot, r#"{"customer":"zed"}"#).0, 200);
    }
    converge(&c, "zed", 3);
    let (count, slots) = counter(c.http, "zed");
    assert_eq!((count, slots), (3, vec![(0, 1), (1, 1), (2, 1)]));
    assert_eq!(admitted(&c, r#"{"customer":"zed"}"#, 6), 0);

    // Node 2 is cut off (stopped) while node 0 takes the reset.
    let node2 = c.node_pid(2);
    signal(node2, "-STOP");
    let (code, text) = request(
        c.http,
        "POST",
        "/v1/counters/reset",
        r#"{"customer":"zed"}"#,
    )
    .unwrap();
    let resumed = Resume(node2);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""acked":[1]"#), "{text}");
    assert!(text.contains(r#""pending":[2]"#), "{text}");
    // Nodes 0 and 1 cleared their slots; node 2's hit is still counted.
    for port in [c.http, c.http + 1] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter(port, "zed") != (1, vec![(2, 1)]) {
            assert!(Instant::now() < deadline, "{:?}", counter(port, "zed"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(1500));

    // The cut heals: node 2 gets the record, clears its slot, and the
    // count is zero everywhere, and stays so.
    drop(resumed);
    converge(&c, "zed", 0);
    std::thread::sleep(Duration::from_secs(1));
    for port in c.http..c.http + 3 {
        assert_eq!(
            counter(port, "zed").0,
            0,
            "the old count came back on {port}"
        );
    }
    // The quota is whole again, exactly.
    assert_eq!(admitted(&c, r#"{"customer":"zed"}"#, 9), 3);
}
