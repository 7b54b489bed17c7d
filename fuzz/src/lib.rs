//! The fuzz targets' bodies: one function per decoder that takes input from
//! outside the process. `fuzz_targets/*.rs` hand them to libFuzzer; the
//! project's `tests/fuzz_regressions.rs` includes this file and replays
//! every seed and every kept crash input through the same functions, so a
//! fixed crash stays fixed under a plain `cargo test`.
//!
//! Each function must never panic: any input is either refused with an
//! error or handled.

use std::sync::{Arc, OnceLock};

use drl::http::request::{BatchRequest, CheckRequest, RefundRequest};
use drl::resp::cell::{Throttle, KEY_FIELD};
use drl::resp::parse::{parse_command, FrameLimits, Parsed};
use drl_core::cluster::replication::{ReplicationConfig, Replicator};
use drl_core::cluster::snapshot;
use drl_core::decide::{block_on_ready, Decider};
use drl_core::descriptor::Descriptors;
use drl_core::limiter::Check;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::request::RequestLimit;
use drl_core::rules::RuleSet;
use drl_core::share::ShareView;
use drl_core::slot::NodeSlot;
use drl_core::time::{ManualClock, Nanos};
use drl_core::wire::Frame;

/// Mid-2023, mid-second.
pub const NOW: Nanos = Nanos::new(1_700_000_040_500_000_000);

/// Rules with one limit of every algorithm, keyed several ways.
pub const RULES: &str = r#"
endpoints = ["/a", "/b"]

[[rules]]
name = "slide"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 10, window = "1s" } ]

[[rules]]
name = "fixed"
match = { endpoint = "/a" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1m" } ]

[[rules]]
name = "bucket"
match = { endpoint = "/b", user = "*" }
key = ["user"]
limits = [ { algorithm = "token_bucket", capacity = 5, refill = 5, per = "1s" }, { algorithm = "gcra", limit = 3, per = "1s" } ]
"#;

pub type FuzzLimiter = Limiter<Arc<ManualClock>>;

/// A three-slot limiter at [`NOW`], fresh for each call (inputs must not
/// leak state into one another: a crash must replay alone).
pub fn limiter() -> FuzzLimiter {
    let rules = RuleSet::from_toml(RULES).expect("the fuzz rules parse");
    let config = LimiterConfig {
        own_slot: NodeSlot::new(0),
        slots: 3,
        max_keys: 64,
        ..LimiterConfig::default()
    };
    Limiter::with_clock(rules, config, Arc::new(ManualClock::new(NOW))).expect("limiter")
}

fn rules_digest() -> u64 {
    static DIGEST: OnceLock<u64> = OnceLock::new();
    *DIGEST.get_or_init(|| RuleSet::from_toml(RULES).expect("rules").digest())
}

/// Peer frames: decoding, and a decoded frame encodes to bytes that decode
/// to the same frame.
pub fn wire_frame(data: &[u8]) {
    if let Ok(frame) = Frame::decode(data) {
        let again = Frame::decode(&frame.encode()).expect("a re-encoded frame decodes");
        assert_eq!(frame, again, "decode(encode(f)) == f");
    }
}

/// The replicator's whole handle path for a frame from an authenticated
/// peer: decode, validate, merge into the limiter, acknowledge. The first
/// byte picks the sending peer's slot (3 is out of range).
pub fn replicator_frame(data: &[u8]) {
    let Some((&from, frame)) = data.split_first() else {
        return;
    };
    let from = NodeSlot::new(u16::from(from % 4));
    let limiter = limiter().clustered(ShareView::alone(0)).expect("clustered");
    limiter.set_admitting(true);
    let mut r = Replicator::new(
        ReplicationConfig::new(NodeSlot::new(0), "fuzz"),
        1,
        false,
        NOW,
    );
    r.add_peer(NodeSlot::new(1));
    r.add_peer(NodeSlot::new(2));
    let _ = r.handle_frame(NOW, from, frame, &limiter, rules_digest());
    while r.poll_transmit().is_some() {}
    r.handle_timeout(NOW + Nanos::from_millis(10), &limiter);
}

/// A snapshot file: restoring checks it whole before merging anything.
pub fn snapshot(data: &[u8]) {
    let l = limiter();
    let _ = snapshot::restore(&l, NOW, data);
}

/// A `POST /v1/check` body (and the same bytes as a batch body), then the
/// check it asks for.
pub fn check_body(data: &[u8]) {
    // The same bytes as a `POST /v1/check/batch` body: each check's
    // descriptors, as the route validates them.
    if let Ok(batch) = BatchRequest::from_json(data) {
        for request in &batch.checks {
            let pairs = request.pairs();
            let _ = pairs.descriptors();
        }
    }
    let Ok(request) = CheckRequest::from_json(data) else {
        return;
    };
    let pairs = request.pairs();
    if let Ok(d) = pairs.descriptors() {
        let l = limiter();
        let _ = l.check_with_receipt(&d, request.cost);
    }
}

/// A `GET /v1/allow` query string, then the check it asks for.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(request) = CheckRequest::from_query(text) else {
        return;
    };
    let pairs = request.pairs();
    if let Ok(d) = pairs.descriptors() {
        let _ = limiter().check(&d, request.cost);
    }
}

/// A `POST /v1/refund` body, then the refund it asks for, against a
/// limiter that has issued one real receipt.
pub fn refund_body(data: &[u8]) {
    let Ok(request) = RefundRequest::from_json(data) else {
        return;
    };
    let l = limiter();
    let fields = [("user", "fuzz"), ("endpoint", "/b")];
    if let Ok(d) = Descriptors::new(&fields) {
        let _ = l.check_with_receipt(&d, 1);
    }
    let _ = l.refund_receipt(&request.receipt);
}

/// A rules file, as `PUT /v1/rules`, a peer's rules frame or the rules
/// file reload would read it.
pub fn rules_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rules) = RuleSet::from_toml(text) {
        let _ = rules.digest();
        let _ = Limiter::new(rules, LimiterConfig::default());
    }
}

/// Bytes from a RESP client, framed command after command as a connection
/// does (with the default limits and with tiny ones), each command's
/// arguments read as `CL.THROTTLE` and `DRL.CHECK` would read them, and
/// the resulting checks run.
pub fn resp_frame(data: &[u8]) {
    let tiny = FrameLimits {
        max_args: 3,
        max_bulk: 8,
        max_frame: 32,
    };
    for limits in [FrameLimits::default(), tiny] {
        let mut at = 0;
        let mut args = Vec::new();
        while at < data.len() {
            let buf = &data[at..];
            match parse_command(buf, &limits, &mut args) {
                Ok(Parsed::Command { len }) => {
                    assert!(len > 0 && len <= buf.len(), "a command is within the input");
                    assert!(args.len() <= limits.max_args);
                    let argv: Vec<&[u8]> = args.iter().map(|r| &buf[r.clone()]).collect();
                    resp_command(&argv);
                    at += len;
                }
                Ok(Parsed::Incomplete) | Err(_) => break,
            }
        }
    }
}

fn resp_command(argv: &[&[u8]]) {
    let Some((_, rest)) = argv.split_first() else {
        return;
    };
    if let Some((key, params)) = rest.split_first() {
        if let (Ok(t), Ok(key)) = (Throttle::from_args(params), std::str::from_utf8(key)) {
            let limiter = Arc::new(limiter());
            let fields = [(KEY_FIELD, key)];
            if let (Ok(limit), Ok(d)) = (
                RequestLimit::new(&t.spec(), limiter.request_limit_policy()),
                Descriptors::new(&fields),
            ) {
                let check = Check::with_limit(d, t.quantity, std::sync::Arc::new(limit));
                let decider = Decider::local(limiter);
                let _ = block_on_ready(decider.decide(std::slice::from_ref(&check)));
            }
        }
    }
    let text: Vec<&str> = rest
        .iter()
        .filter_map(|a| std::str::from_utf8(a).ok())
        .collect();
    let pairs: Vec<(&str, &str)> = text.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    if let Ok(d) = Descriptors::new(&pairs) {
        let _ = limiter().check(&d, 1);
    }
}
