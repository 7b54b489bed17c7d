//! Tests of `transport.rs`.
use super::*;

fn node() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

#[test]
fn body_escapes_and_carries_cost() {
    let req = CheckRequest {
        fields: vec![("user".to_owned(), "a\"b".to_owned())].into(),
        cost: 7,
        limit: Some(Arc::new(crate::limits::sliding_window(5, "1m"))),
    };
    let v: Value = serde_json::from_slice(&check_body(&req)).unwrap();
    assert_eq!(v["user"], "a\"b");
    assert_eq!(v["cost"], 7);
    assert_eq!(v["limit"]["algorithm"], "sliding_window");
    assert_eq!(v["limit"]["limit"], 5);
    assert_eq!(v["limit"]["window"], "1m");
}

#[test]
fn allowed_denied_never_and_unlimited_parse() {
    let a = parse_check(
        node(),
        200,
        br#"{"allowed":true,"outcome":"allowed","rule":"r","limit":5,"window_ms":1000,"remaining":4,"reset_ms":200,"retry_after_ms":0}"#,
    )
    .unwrap();
    let CheckAnswer::Decided {
        outcome,
        quota,
        receipt,
    } = a
    else {
        panic!()
    };
    assert_eq!(outcome, Outcome::Allowed);
    let q = quota.unwrap();
    assert_eq!((q.limit, q.remaining), (5, 4));
    assert_eq!(q.window, Duration::from_secs(1));
    assert_eq!(receipt, None);
    let n = parse_check(
        node(),
        429,
        br#"{"allowed":false,"outcome":"never","rule":"r","limit":5,"window_ms":1000,"remaining":0,"reset_ms":0,"retry_after_ms":null}"#,
    )
    .unwrap();
    let CheckAnswer::Decided { outcome, quota, .. } = n else {
        panic!()
    };
    assert_eq!(outcome, Outcome::Never);
    assert_eq!(quota.unwrap().retry_after, None);
    let u = parse_check(
        node(),
        200,
        br#"{"allowed":true,"outcome":"allowed","rule":null}"#,
    )
    .unwrap();
    assert_eq!(
        u,
        CheckAnswer::Decided {
            outcome: Outcome::Allowed,
            quota: None,
            receipt: None
        }
    );
}

#[test]
fn refusals_and_failures_are_told_apart() {
    assert_eq!(
        parse_check(node(), 400, br#"{"error":"bad"}"#).unwrap(),
        CheckAnswer::Refused("bad".into())
    );
    let recovering = parse_check(node(), 503, br#"{"error":"recovering"}"#).unwrap_err();
    assert_eq!(
        recovering,
        TransportError::Unavailable(node(), "recovering".into())
    );
    assert!(recovering.counted_nothing(), "a 503 counted nothing");
    let odd = parse_check(node(), 502, b"{}").unwrap_err();
    assert_eq!(odd, TransportError::Status(node(), 502));
    assert!(!odd.counted_nothing(), "a proxy's 502 may hide a count");
    assert!(matches!(
        parse_check(node(), 200, b"not json"),
        Err(TransportError::Malformed(..))
    ));
    assert!(matches!(
        parse_check(node(), 200, br#"{"outcome":"maybe"}"#),
        Err(TransportError::Malformed(..))
    ));
}

#[test]
fn receipts_and_refund_answers_parse() {
    let a = parse_check(
        node(),
        200,
        br#"{"allowed":true,"outcome":"allowed","rule":"r","limit":5,"window_ms":1000,"remaining":4,"reset_ms":200,"retry_after_ms":0,"receipt":"01ab"}"#,
    )
    .unwrap();
    let CheckAnswer::Decided { receipt, .. } = a else {
        panic!()
    };
    assert_eq!(receipt.as_deref(), Some("01ab"));
    assert_eq!(
        parse_refund(node(), 200, br#"{"refunded":1,"requested":2,"limits":[]}"#).unwrap(),
        RefundAnswer::Refunded {
            refunded: 1,
            requested: 2
        }
    );
    assert!(matches!(
        parse_refund(node(), 421, br#"{"error":"slot 2"}"#).unwrap(),
        RefundAnswer::OtherNode(m) if m == "slot 2"
    ));
    assert!(matches!(
        parse_refund(node(), 409, b"{}").unwrap(),
        RefundAnswer::Refused(RefundRefusal::AlreadyRefunded, _)
    ));
    assert!(matches!(
        parse_refund(node(), 410, b"{}").unwrap(),
        RefundAnswer::Refused(RefundRefusal::Expired, _)
    ));
    assert!(parse_refund(node(), 503, b"{}")
        .unwrap_err()
        .counted_nothing());
    assert!(parse_refund(node(), 200, b"{}").is_err(), "no amounts");
}

#[test]
fn batch_answers_parse_per_check_and_refusals_of_the_whole_apply_to_each() {
    let answer = br#"{"allowed":true,"results":[
        {"allowed":true,"outcome":"allowed","rule":"r","limit":5,"window_ms":1000,"remaining":4,"receipt":"abc"},
        {"status":400,"error":"bad name"},
        {"status":503,"error":"recovering"}]}"#;
    let items = parse_batch(node(), 200, answer, 3).unwrap();
    assert!(matches!(
        &items[0],
        Ok(CheckAnswer::Decided { outcome: Outcome::Allowed, receipt: Some(r), .. }) if &**r == "abc"
    ));
    assert_eq!(items[1], Ok(CheckAnswer::Refused("bad name".into())));
    assert!(matches!(items[2], Err(TransportError::Unavailable(..))));
    // One result short is not a batch answer.
    assert!(matches!(
        parse_batch(node(), 200, answer, 4),
        Err(TransportError::Malformed(..))
    ));
    let refused = parse_batch(node(), 400, br#"{"error":"check 1: bad"}"#, 2).unwrap();
    assert_eq!(
        refused,
        vec![
            Ok(CheckAnswer::Refused("check 1: bad".into())),
            Ok(CheckAnswer::Refused("check 1: bad".into()))
        ]
    );
    assert!(matches!(
        parse_batch(node(), 503, b"{}", 2),
        Err(TransportError::Unavailable(..))
    ));
    let body: Value = serde_json::from_slice(&batch_body(
        &[CheckRequest {
            fields: vec![("user".to_owned(), "a".to_owned())].into(),
            cost: 2,
            limit: None,
        }],
        true,
    ))
    .unwrap();
    assert_eq!(body["independent"], true);
    assert_eq!(body["checks"][0]["user"], "a");
    assert_eq!(body["checks"][0]["cost"], 2);
}
