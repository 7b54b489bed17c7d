//! The native gRPC API (`drl.v1.RateLimiter`) over real sockets, with the
//! tonic client generated from `proto-spec/drl/v1/ratelimiter.proto`: the
//! full decision, atomic and independent batches, refunds, and refusals
//! that change nothing.

mod grpc_support;

use std::collections::HashMap;

use drl::grpc::native::{item_code, MAX_BATCH};
use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
use drl::grpc::pb::{
    check_result, CheckBatchRequest, CheckBatchResponse, CheckRequest, CheckResponse, Outcome,
    RefundRequest,
};
use tonic::transport::Channel;
use tonic::Code;

use grpc_support::{cluster_dir, GrpcNode};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 5, window = "1h" } ]

[[rules]]
name = "bucket"
match = { bucket = "*" }
limits = [ { algorithm = "token_bucket", capacity = 4, refill = 4, per = "1h" } ]
"#;

type Client = RateLimiterClient<Channel>;

fn check(fields: &[(&str, &str)], cost: Option<u32>) -> CheckRequest {
    CheckRequest {
        descriptors: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        cost,
        limit: None,
    }
}

async fn decide(client: &mut Client, r: CheckRequest) -> CheckResponse {
    client.check(r).await.unwrap().into_inner()
}

async fn one_node(name: &str) -> (GrpcNode, Client) {
    let dir = cluster_dir(name, 1, RULES);
    let node = GrpcNode::start(&dir, 0, vec![]).await;
    node.wait_ready().await;
    let client = Client::connect(node.grpc_url()).await.unwrap();
    (node, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_gives_the_full_decision() {
    let (node, mut client) = one_node("check").await;
    let alice = || check(&[("user", "alice")], None);
    for left in (0..5u64).rev() {
        let r = decide(&mut client, alice()).await;
        assert!(r.allowed);
        assert_eq!(r.outcome, Outcome::Allowed as i32);
        assert_eq!(r.rule.as_deref(), Some("per-user"));
        assert_eq!(r.limit, Some(5));
        assert_eq!(r.window_ms, Some(3_600_000));
        assert_eq!(r.remaining, Some(left));
        assert_eq!(r.retry_after_ms, Some(0));
        assert!(
            !r.receipt.is_empty(),
            "an allowed check carries its receipt"
        );
    }
    let r = decide(&mut client, alice()).await;
    assert!(!r.allowed);
    assert_eq!(r.outcome, Outcome::Denied as i32);
    assert!(r.retry_after_ms.unwrap() > 0);
    // Cost 0 reports without counting.
    let r = decide(&mut client, check(&[("user", "bob")], Some(0))).await;
    assert_eq!(r.remaining, Some(5));
    let r = decide(&mut client, check(&[("user", "bob")], Some(3))).await;
    assert_eq!(r.remaining, Some(2));
    // More than the limit can ever admit.
    let r = decide(&mut client, check(&[("user", "carol")], Some(6))).await;
    assert_eq!(r.outcome, Outcome::Never as i32);
    assert_eq!((r.reset_ms, r.retry_after_ms), (None, None));
    assert!(r.message.unwrap().contains("retrying cannot succeed"));
    // No rule matched.
    let r = decide(&mut client, check(&[("tenant", "x")], None)).await;
    assert!(r.allowed);
    assert_eq!((r.rule, r.limit), (None, None));
    // Bad input: refused, nothing counted.
    for bad in [
        check(&[], None),
        check(&[("User", "x")], None),
        check(&[("user", "")], None),
        check(&[("user", "a\nb")], None),
    ] {
        let e = client.check(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let r = decide(&mut client, check(&[("user", "bob")], Some(0))).await;
    assert_eq!(r.remaining, Some(2));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_batch_decides_each_check_on_its_own() {
    let (node, mut client) = one_node("batch").await;
    let mut checks = Vec::new();
    for i in 0..100 {
        checks.push(match i % 4 {
            // 25 asks of one user: 5 allowed.
            0 => check(&[("user", "dave")], None),
            // 25 distinct users: all allowed.
            1 => check(&[("user", &format!("u{i}"))], None),
            // 25 bad checks.
            2 => check(&[("Bad", "x")], None),
            // 25 of a token bucket of 4.
            _ => check(&[("bucket", "b")], None),
        });
    }
    let results = client
        .check_batch(CheckBatchRequest {
            checks,
            independent: true,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 100);
    let mut allowed = [0usize; 4];
    let mut errors = 0;
    for (i, r) in results.iter().enumerate() {
        match r.result.as_ref().unwrap() {
            check_result::Result::Decision(d) => {
                assert_ne!(i % 4, 2);
                if d.allowed {
                    allowed[i % 4] += 1;
                }
            }
            check_result::Result::Error(e) => {
                assert_eq!(i % 4, 2);
                assert_eq!(item_code(e), Code::InvalidArgument);
                assert!(e.message.contains("not valid"), "{}", e.message);
                errors += 1;
            }
        }
    }
    assert_eq!(allowed, [5, 25, 0, 4]);
    assert_eq!(errors, 25);
    // Too large a batch is refused whole.
    let checks = vec![check(&[("user", "erin")], None); MAX_BATCH + 1];
    let e = client
        .check_batch(CheckBatchRequest {
            checks,
            independent: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let r = decide(&mut client, check(&[("user", "erin")], Some(0))).await;
    assert_eq!(r.remaining, Some(5), "nothing counted");
    // An empty batch is an empty answer.
    let r = client
        .check_batch(CheckBatchRequest {
            checks: vec![],
            independent: true,
        })
        .await
        .unwrap();
    assert!(r.into_inner().results.is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_batch_counts_every_check_or_none() {
    let (node, mut client) = one_node("atomic").await;
    let batch = |user: &str| CheckBatchRequest {
        checks: vec![
            check(&[("user", user)], Some(2)),
            check(&[("bucket", "shared")], None),
        ],
        independent: false,
    };
    let decided = |r: &CheckBatchResponse| -> Vec<CheckResponse> {
        r.results
            .iter()
            .map(|r| match r.result.as_ref().unwrap() {
                check_result::Result::Decision(d) => d.clone(),
                check_result::Result::Error(e) => {
                    panic!("an atomic batch has no item errors: {e:?}")
                }
            })
            .collect()
    };
    // Twice for gina: both checks counted each time (user 4 of 5, bucket 2
    // of 4), each with its own receipt.
    for left in [3u64, 1] {
        let r = client
            .check_batch(batch("gina"))
            .await
            .unwrap()
            .into_inner();
        let d = decided(&r);
        assert!(d.iter().all(|d| d.allowed), "{d:?}");
        assert_eq!(d[0].remaining, Some(left));
        assert!(!d[0].receipt.is_empty() && !d[1].receipt.is_empty());
    }
    // The third asks 2 of gina's 1 left: refused, and the bucket, which had
    // room, is not charged.
    let r = client
        .check_batch(batch("gina"))
        .await
        .unwrap()
        .into_inner();
    let d = decided(&r);
    assert!(d.iter().all(|d| !d.allowed), "{d:?}");
    assert_eq!(d[0].outcome, Outcome::Denied as i32);
    assert_eq!(d[1].outcome, Outcome::Denied as i32);
    assert!(d[1].message.as_deref().unwrap().contains("another check"));
    assert!(
        d[1].receipt.is_empty(),
        "nothing counted, nothing to refund"
    );
    let bucket = decide(&mut client, check(&[("bucket", "shared")], Some(0))).await;
    assert_eq!(
        bucket.remaining,
        Some(2),
        "the refused batch charged nothing"
    );
    // A bad check refuses the whole call, counting nothing.
    let mut bad = batch("hank");
    bad.checks.push(check(&[("Bad", "x")], None));
    let e = client.check_batch(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("check 2"), "{}", e.message());
    let hank = decide(&mut client, check(&[("user", "hank")], Some(0))).await;
    assert_eq!(hank.remaining, Some(5));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_gives_back_what_was_counted() {
    let (node, mut client) = one_node("refund").await;
    let frank = |cost| check(&[("user", "frank")], cost);
    let charged = decide(&mut client, frank(Some(3))).await;
    assert!(charged.allowed);
    let refund = |receipt: Vec<u8>| RefundRequest {
        descriptors: [("user".to_owned(), "frank".to_owned())].into(),
        cost: None,
        receipt,
    };
    // Exactly what the receipt's check charged, once.
    let r = client
        .refund(refund(charged.receipt.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.refunded, r.requested), (3, 3));
    let d = decide(&mut client, frank(Some(0))).await;
    assert_eq!(d.remaining, Some(5));
    let e = client
        .refund(refund(charged.receipt.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Refused, and nothing given back: no receipt, a forged one.
    let e = client.refund(refund(vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client.refund(refund(b"forged".to_vec())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let d = decide(&mut client, frank(Some(0))).await;
    assert_eq!(d.remaining, Some(5));
    node.shutdown().await;
}
