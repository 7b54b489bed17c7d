//! Hostile callers against the in-process limiter: refunds that could give
//! back what was never charged, key floods that could evict a victim's
//! usage, costs that can never succeed.

use std::sync::Arc;

use drl_core::descriptor::{Descriptors, ENDPOINT, USER};
use drl_core::key::KeySeed;
use drl_core::limiter::{Limiter, LimiterConfig, Outcome, RefundError};
use drl_core::rules::RuleSet;
use drl_core::slot::NodeSlot;
use drl_core::time::{ManualClock, Nanos};

const NOW: Nanos = Nanos::new(1_700_000_040_500_000_000);

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 100, window = "1h" } ]

[[rules]]
name = "shared"
match = { endpoint = "/shared" }
limits = [ { algorithm = "fixed_window", limit = 10, window = "1h" } ]
"#;

type TestLimiter = Limiter<Arc<ManualClock>>;

fn limiter(config: LimiterConfig) -> (TestLimiter, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(NOW));
    let rules = RuleSet::from_toml(RULES).unwrap();
    (
        Limiter::with_clock(rules, config, clock.clone()).unwrap(),
        clock,
    )
}

fn check(l: &TestLimiter, user: &str, cost: u32) -> (Outcome, Option<String>) {
    let fields = [(USER, user)];
    let d = Descriptors::new(&fields).unwrap();
    let (decision, receipt) = l.check_with_receipt(&d, cost).unwrap();
    (decision.outcome, receipt)
}

fn check_shared(l: &TestLimiter, user: &str, cost: u32) -> (Outcome, Option<String>) {
    let fields = [(USER, user), (ENDPOINT, "/shared")];
    let d = Descriptors::new(&fields).unwrap();
    let (decision, receipt) = l.check_with_receipt(&d, cost).unwrap();
    (decision.outcome, receipt)
}

/// Issue 10, item 2: with `max_keys = 1000`, a denied victim stays denied
/// after 3,000 new ids pushed it out of the table.
#[test]
fn a_key_flood_does_not_reset_a_victims_quota() {
    let (l, _) = limiter(LimiterConfig {
        max_keys: 1000,
        ..LimiterConfig::default()
    });
    assert_eq!(check(&l, "victim", 100).0, Outcome::Allowed);
    assert_eq!(check(&l, "victim", 1).0, Outcome::Denied);
    for i in 0..3_000 {
        check(&l, &format!("flood-{i}"), 1);
    }
    assert!(l.evictions() > 0, "the flood evicted keys");
    assert!(l.keys_tracked() <= 2 * 1000, "memory stays bounded");
    assert_eq!(
        check(&l, "victim", 1).0,
        Outcome::Denied,
        "the evicted victim came back with a fresh budget"
    );
}

/// Issue 10, item 5: a request answered "never" creates no key entry.
#[test]
fn a_request_that_can_never_pass_creates_no_key() {
    let (l, _) = limiter(LimiterConfig::default());
    for i in 0..50 {
        assert_eq!(check(&l, &format!("big-{i}"), 101).0, Outcome::Never);
    }
    assert_eq!(l.keys_tracked(), 0);
}

/// Issue 10, item 1: the refund route cannot give back what was not
/// charged: no receipt, no refund; a receipt refunds its own cost once.
#[test]
fn receipts_refund_exactly_what_their_check_charged_once() {
    let (l, _) = limiter(LimiterConfig::default());
    // The shared limit is exhausted by ten users.
    let mut receipts = Vec::new();
    for i in 0..10 {
        let (o, r) = check_shared(&l, &format!("u{i}"), 1);
        assert_eq!(o, Outcome::Allowed);
        receipts.push(r.expect("an allowed check has a receipt"));
    }
    assert_eq!(check_shared(&l, "mallory", 1).0, Outcome::Denied);
    // Mallory's own receipt from another route refunds only her key there.
    let (_, mine) = check(&l, "mallory", 1);
    let out = l.refund_receipt(mine.as_deref().unwrap()).unwrap();
    assert_eq!(out.requested, 1);
    assert_eq!(out.limits.len(), 1, "only the limit her check counted");
    assert_eq!(check_shared(&l, "mallory", 1).0, Outcome::Denied);
    // Replaying one receipt 500 times gives back one hit.
    let first = &receipts[0];
    assert_eq!(l.refund_receipt(first).unwrap().refunded(), 1);
    for _ in 0..500 {
        assert_eq!(
            l.refund_receipt(first).unwrap_err(),
            RefundError::AlreadyRefunded
        );
    }
    assert_eq!(check_shared(&l, "mallory", 1).0, Outcome::Allowed);
    assert_eq!(check_shared(&l, "mallory", 1).0, Outcome::Denied);
    // Forged: a receipt with its cost digit changed fails the MAC.
    let mut forged = receipts[1].clone().into_bytes();
    forged[40] = if forged[40] == b'f' { b'e' } else { b'f' };
    assert!(matches!(
        l.refund_receipt(std::str::from_utf8(&forged).unwrap()),
        Err(RefundError::Invalid(_))
    ));
    assert_eq!(check_shared(&l, "mallory", 1).0, Outcome::Denied);
    // Cost 0 and denials get no receipt.
    assert_eq!(check(&l, "peek", 0).1, None);
    assert_eq!(check_shared(&l, "mallory", 1).1, None);
}

#[test]
fn receipts_are_spent_where_and_while_they_were_issued() {
    let seed = KeySeed(7, 9);
    let config = |slot| LimiterConfig {
        own_slot: NodeSlot::new(slot),
        slots: 2,
        seed,
        ..LimiterConfig::default()
    };
    let (a, clock) = limiter(config(0));
    let (b, _) = limiter(config(1));
    let (_, r) = check(&a, "x", 3);
    let r = r.unwrap();
    assert_eq!(
        b.refund_receipt(&r).unwrap_err(),
        RefundError::OtherNode { slot: 0 }
    );
    // The same node after a restart: a new run, the spent set is gone.
    let (a2, _) = limiter(config(0));
    assert_eq!(a2.refund_receipt(&r).unwrap_err(), RefundError::OtherRun);
    // Another cluster's seed cannot read it at all.
    let (other, _) = limiter(LimiterConfig::default());
    assert!(matches!(
        other.refund_receipt(&r),
        Err(RefundError::Invalid(_))
    ));
    // Once the window has passed there is nothing to give back.
    clock.advance(Nanos::from_secs(2 * 3600 + 1));
    assert_eq!(a.refund_receipt(&r).unwrap_err(), RefundError::Expired);
}
