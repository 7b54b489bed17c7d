//! Refunds on any node, on real processes (`drl cluster`, three nodes): a
//! receipt issued by one node is refunded through another, which forwards
//! the refund to the issuer over the peer connection; a second refund of
//! it, through a third node, gives nothing back; and while the issuer is
//! stopped (SIGSTOP) a forwarded refund is answered 503 with Retry-After
//! within the forward timeout, and is given back exactly once when the
//! issuer is back.

mod support;

use std::time::{Duration, Instant};

use support::cluster::LocalCluster;
use support::{request, signal, Resume};

const RULES: &str = r#"
[[rules]]
name = "per-customer"
match = { customer = "*" }
limits = [ { algorithm = "fixed_window", limit = 4, window = "1h" } ]
"#;

/// Status, and the body as JSON.
fn call(port: u16, path: &str, body: &str) -> (u16, serde_json::Value, String) {
    let (code, text) = request(port, "POST", path, body).expect("the node answers");
    let json = text
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, json, text)
}

/// An allowed check of `customer` on `port`, and its receipt.
fn spend(port: u16, customer: &str) -> String {
    let (code, json, text) = call(
        port,
        "/v1/check",
        &format!(r#"{{"customer":"{customer}"}}"#),
    );
    assert_eq!(code, 200, "{text}");
    json["receipt"]
        .as_str()
        .unwrap_or_else(|| panic!("no receipt in {text}"))
        .to_owned()
}

fn refund(port: u16, receipt: &str) -> (u16, serde_json::Value, String) {
    call(port, "/v1/refund", &format!(r#"{{"receipt":"{receipt}"}}"#))
}

/// The cluster-wide count of the customer's counter as `port` sees it.
fn count(port: u16, customer: &str) -> u64 {
    let (code, json, text) = call(
        port,
        "/v1/counters",
        &format!(r#"{{"customer":"{customer}"}}"#),
    );
    assert_eq!(code, 200, "{text}");
    json["counters"][0]["count"].as_u64().unwrap_or(0)
}

fn converge(c: &LocalCluster, customer: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in c.http..c.http + 3 {
        while count(port, customer) != want {
            assert!(
                Instant::now() < deadline,
                "node on {port} sees {} of {customer}, not {want}",
                count(port, customer)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_receipt_is_refunded_through_any_node_once() {
    let c = LocalCluster::start("refund-anywhere");
    c.put_rules(RULES, "per-customer");

    // Two hits through node 0; refund the first through node 1.
    let first = spend(c.http, "ivy");
    let second = spend(c.http, "ivy");
    converge(&c, "ivy", 2);
    let (code, json, text) = refund(c.http + 1, &first);
    assert_eq!(code, 200, "{text}");
    assert_eq!(json["refunded"], 1, "{text}");
    converge(&c, "ivy", 1);

    // Once only, wherever it is presented again.
    for port in [c.http + 2, c.http, c.http + 1] {
        let (code, _, text) = refund(port, &first);
        assert_eq!(code, 409, "a second refund through {port}: {text}");
    }
    converge(&c, "ivy", 1);

    // An altered receipt is refused where it arrives, and goes nowhere.
    let mut forged = second.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let (code, _, text) = refund(c.http + 2, std::str::from_utf8(&forged).unwrap());
    assert_eq!(code, 400, "{text}");

    // The quota is exactly what the refund gave back: 4 - 1 left to spend
    // through the three nodes.
    let admitted = (0..9)
        .filter(|i| {
            call(
                c.http + (i % 3) as u16,
                "/v1/check",
                r#"{"customer":"ivy"}"#,
            )
            .0 == 200
        })
        .count();
    assert_eq!(admitted, 3);
}

#[test]
fn a_stopped_issuer_makes_the_refund_retryable_not_lost() {
    let c = LocalCluster::start("refund-issuer-stopped");
    c.put_rules(RULES, "per-customer");
    let receipt = spend(c.http + 2, "kit");
    converge(&c, "kit", 1);

    let issuer = c.node_pid(2);
    signal(issuer, "-STOP");
    let resume = Resume(issuer);
    let began = Instant::now();
    let (code, _, text) = refund(c.http, &receipt);
    let waited = began.elapsed();
    assert_eq!(code, 503, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    assert!(text.contains("did not answer"), "{text}");
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    drop(resume);

    // Back: the retry is answered. The ask sent while the issuer was
    // stopped may have reached it when it resumed (the peer stream keeps
    // it), so the retry finds the receipt refunded (409) or refunds it
    // (200); either way it was given back exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, json, text) = refund(c.http, &receipt);
        if code == 200 {
            assert_eq!(json["refunded"], 1, "{text}");
            break;
        }
        if code == 409 {
            break;
        }
        assert_eq!(code, 503, "{text}");
        assert!(
            Instant::now() < deadline,
            "the issuer never answered: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    converge(&c, "kit", 0);
    assert_eq!(refund(c.http + 1, &receipt).0, 409);
    // Exactly once: the whole quota of 4 is back, no more.
    let admitted = (0..12)
        .filter(|i| {
            call(
                c.http + (i % 3) as u16,
                "/v1/check",
                r#"{"customer":"kit"}"#,
            )
            .0 == 200
        })
        .count();
    assert_eq!(admitted, 4);
}
