//! The RESP API over real sockets: a real Redis client library against a
//! real node, raw bytes for framing and hostile input, and a three-node
//! cluster sharing one `CL.THROTTLE` key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{NodeApi, NodeFile};
use drl::server::{RunError, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
name = "search"
match = { endpoint = "/v1/search", user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 3, window = "1h" } ]

# A rule that matches every CL.THROTTLE key: it must not be consulted, the
# calls carry their own limits.
[[rules]]
name = "every-cell-key"
match = { cl_key = "*" }
limits = [ { algorithm = "fixed_window", limit = 100000, window = "1h" } ]
"#;

fn scratch(name: &str, size: u16) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-resp-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(size)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

struct TestNode {
    resp: SocketAddr,
    http: SocketAddr,
    peer: String,
    api: NodeApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    async fn start(dir: &Path, slot: u16, seeds: Vec<String>) -> TestNode {
        let file = NodeFile {
            recovery_timeout: "200ms".into(),
            resp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..NodeFile::local(dir, slot, seeds)
        };
        let node = Server::start(file.settings(dir).unwrap()).await.unwrap();
        let resp = node.resp_addr().expect("RESP listener configured");
        let http = node.http_addr();
        let peer = node.node().peer_addr().to_string();
        let api = node.node().api();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        TestNode {
            resp,
            http,
            peer,
            api,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.resp))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("shutdown within 15 s")
            .unwrap()
            .unwrap();
    }
}

async fn ready(nodes: &[&TestNode]) {
    let start = Instant::now();
    let size = nodes.len();
    while !nodes.iter().all(|n| {
        let s = n.api.status();
        s.ready && s.live.len() == size - 1
    }) {
        assert!(start.elapsed() < Duration::from_secs(60), "nodes not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn one_node(name: &str) -> TestNode {
    let dir = scratch(name, 1);
    let node = TestNode::start(&dir, 0, vec![]).await;
    ready(&[&node]).await;
    node
}

async fn throttle(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    args: &[i64],
) -> redis::RedisResult<Vec<i64>> {
    let mut cmd = redis::cmd("CL.THROTTLE");
    cmd.arg(key);
    for a in args {
        cmd.arg(*a);
    }
    cmd.query_async(con).await
}

/// Sends `bytes` in one write and reads until `want` bytes came or the
/// peer closed; returns what came and whether it closed.
async fn raw(addr: SocketAddr, bytes: &[u8], want: usize) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(5);
    while got.len() < want {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Err(_) => break,
        }
    }
    // Closed now? A short wait tells.
    let closed = matches!(
        tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    (String::from_utf8_lossy(&got).into(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_throttle_answers_like_redis_cell() {
    let node = one_node("cell").await;
    let mut con = node.client().await;
    let rules_before = node.api.limiter.rules().source().to_owned();
    // redis-cell's README: 15 burst, 30 per 60 s, whatever the rules say
    // (a catch-all of 100,000 an hour is in force).
    let first = throttle(&mut con, "user123", &[15, 30, 60, 1])
        .await
        .unwrap();
    assert_eq!(&first[..4], &[0, 16, 15, -1], "{first:?}");
    // Counts are kept in time buckets: the reset may read up to a bucket
    // late (and rounds up).
    assert!((2..=6).contains(&first[4]), "reset after {}", first[4]);
    // Quantity defaults to 1; 0 reads without counting.
    let second = throttle(&mut con, "user123", &[15, 30, 60]).await.unwrap();
    assert_eq!(&second[..3], &[0, 16, 14]);
    let peek = throttle(&mut con, "user123", &[15, 30, 60, 0])
        .await
        .unwrap();
    assert_eq!(&peek[..3], &[0, 16, 14]);
    // The rest of the burst, then refused with a retry time.
    let rest = throttle(&mut con, "user123", &[15, 30, 60, 14])
        .await
        .unwrap();
    assert_eq!(&rest[..4], &[0, 16, 0, -1]);
    let refused = throttle(&mut con, "user123", &[15, 30, 60]).await.unwrap();
    assert_eq!(&refused[..3], &[1, 16, 0]);
    assert!((1..=6).contains(&refused[3]), "retry after {}", refused[3]);
    // Other keys and other triples are other limits.
    let other = throttle(&mut con, "user456", &[15, 30, 60]).await.unwrap();
    assert_eq!(&other[..3], &[0, 16, 15]);
    let triple = throttle(&mut con, "user123", &[0, 1, 10]).await.unwrap();
    assert_eq!(&triple[..4], &[0, 1, 0, -1]);
    // More than the bucket holds: limited, and waiting cannot help.
    let never = throttle(&mut con, "user789", &[1, 1, 10, 3]).await.unwrap();
    assert_eq!((never[0], never[3]), (1, -1));
    // The same key asked with other parameters counts apart, and the rules
    // were never touched.
    let other_params = throttle(&mut con, "user123", &[4, 30, 60]).await.unwrap();
    assert_eq!(&other_params[..3], &[0, 5, 4]);
    assert_eq!(node.api.limiter.rules().source(), rules_before);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let node = one_node("bad").await;
    let mut con = node.client().await;
    let before = throttle(&mut con, "k", &[4, 1, 60, 0]).await.unwrap();
    assert_eq!(&before[..3], &[0, 5, 5]);
    let rules_before = node.api.limiter.rules().source().to_owned();
    for (args, want) in [
        (vec!["k", "4", "1"], "wrong number of arguments"),
        (
            vec!["k", "4", "1", "60", "1", "9"],
            "wrong number of arguments",
        ),
        (vec!["k", "four", "1", "60"], "not an integer"),
        (vec!["k", "4", "1", "60", "-1"], "not an integer"),
        (vec!["k", "4", "0", "60"], "must be positive"),
        (vec!["k", "4", "1", "0"], "must be positive"),
        (vec!["k", "99999999999", "1", "60"], "not an integer"),
        (vec!["", "4", "1", "60"], "key"),
    ] {
        let mut cmd = redis::cmd("CL.THROTTLE");
        for a in &args {
            cmd.arg(*a);
        }
        let err = cmd
            .query_async::<Vec<i64>>(&mut con)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(want), "{args:?}: {err}");
    }
    let err = redis::cmd("NOPE")
        .arg("x")
        .query_async::<String>(&mut con)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown command 'NOPE'"), "{err}");
    let err = redis::cmd("DRL.CHECK")
        .arg("user")
        .query_async::<Vec<i64>>(&mut con)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("wrong number of arguments"),
        "{err}"
    );
    let err = redis::cmd("DRL.CHECK")
        .arg("User")
        .arg("x")
        .query_async::<Vec<i64>>(&mut con)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid"), "{err}");
    // Nothing was counted, no rule was added, and the connection serves on.
    let after = throttle(&mut con, "k", &[4, 1, 60, 0]).await.unwrap();
    assert_eq!(&after[..3], &[0, 5, 5]);
    assert_eq!(node.api.limiter.rules().source(), rules_before);
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drl_check_uses_the_rules() {
    let node = one_node("check").await;
    let mut con = node.client().await;
    let check = |user: &'static str, cost: Option<u32>| {
        let mut cmd = redis::cmd("DRL.CHECK");
        cmd.arg("endpoint").arg("/v1/search").arg("user").arg(user);
        if let Some(c) = cost {
            cmd.arg("COST").arg(c);
        }
        cmd
    };
    let a: Vec<i64> = check("alice", None).query_async(&mut con).await.unwrap();
    assert_eq!(&a[..4], &[1, 3, 2, -1]);
    // A fixed window of an hour: it resets at the window's end.
    assert!((1..=3_600_000).contains(&a[4]), "reset in ms: {}", a[4]);
    let b: Vec<i64> = check("alice", Some(2)).query_async(&mut con).await.unwrap();
    assert_eq!(&b[..3], &[1, 3, 0]);
    let c: Vec<i64> = check("alice", None).query_async(&mut con).await.unwrap();
    assert_eq!(&c[..3], &[0, 3, 0]);
    assert!(c[3] > 0, "retry after in ms");
    let never: Vec<i64> = check("bob", Some(4)).query_async(&mut con).await.unwrap();
    assert_eq!((never[0], never[3]), (0, -1));
    // No rule matches: allowed, no limit.
    let free: Vec<i64> = redis::cmd("DRL.CHECK")
        .arg("ip")
        .arg("10.0.0.1")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(free, [1, -1, -1, -1, -1]);
    // Monitoring sees them as RESP decisions, by result and rule.
    let metrics = drl::http::client::Connection::open_addr(node.http)
        .await
        .unwrap()
        .get("/metrics")
        .await
        .unwrap()
        .text();
    let decisions = |result: &str, rule: &str| {
        let series = format!(
            "drl_decisions_total{{result=\"{result}\",rule=\"{rule}\",protocol=\"resp\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {series}in\n{metrics}"))
    };
    assert_eq!(decisions("allowed", "search"), 2);
    assert_eq!(decisions("denied", "search"), 1);
    assert_eq!(decisions("never", "search"), 1);
    assert_eq!(decisions("allowed", ""), 1);
    assert!(
        metrics.contains("drl_decision_duration_seconds_count{protocol=\"resp\"} 5"),
        "{metrics}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_are_answered_in_order() {
    let node = one_node("pipe").await;
    let mut con = node.client().await;
    let mut pipe = redis::pipe();
    for _ in 0..20 {
        pipe.cmd("CL.THROTTLE").arg("p").arg(9).arg(1).arg(3600);
    }
    let answers: Vec<Vec<i64>> = pipe.query_async(&mut con).await.unwrap();
    let remaining: Vec<i64> = answers.iter().map(|a| a[2]).collect();
    let limited: Vec<i64> = answers.iter().map(|a| a[0]).collect();
    assert_eq!(remaining[..10], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
    assert_eq!(limited[..10], [0; 10]);
    assert_eq!(limited[10..], [1; 10]);

    // Raw: RESP arrays and inline commands mixed in one write.
    let batch =
        b"*1\r\n$4\r\nPING\r\nPING hello\r\n*2\r\n$4\r\nECHO\r\n$3\r\na\r\n\r\nQUIT\r\nPING\r\n";
    let want = "+PONG\r\n$5\r\nhello\r\n$3\r\na\r\n\r\n+OK\r\n";
    let (got, closed) = raw(node.resp, batch, want.len()).await;
    assert_eq!(got, want, "nothing after QUIT");
    assert!(closed, "QUIT closes");
    // COMMAND, as clients probe it.
    let (got, _) = raw(node.resp, b"COMMAND DOCS\r\n", 4).await;
    assert_eq!(got, "*0\r\n");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_framing_closes_only_that_connection() {
    let node = one_node("hostile").await;
    for (bytes, want) in [
        (
            &b"*1\r\n$999999999\r\n"[..],
            "-ERR Protocol error: bulk string",
        ),
        (b"*100000\r\n", "-ERR Protocol error: too many arguments"),
        (b"*1\r\n+PING\r\n", "-ERR Protocol error: expected '$'"),
        (b"*1\r\n$4\r\nPINGxx", "-ERR Protocol error: missing CRLF"),
        (b"*zz\r\n", "-ERR Protocol error: invalid multibulk length"),
    ] {
        let (got, closed) = raw(node.resp, bytes, want.len()).await;
        assert!(got.starts_with(want), "{bytes:?}: {got:?}");
        assert!(closed, "{bytes:?}: closed after a protocol error");
    }
    // A line that never ends is refused at the frame limit, not buffered.
    let (got, closed) = raw(node.resp, &vec![b'a'; 100_000], 20).await;
    assert!(
        got.starts_with("-ERR Protocol error: command larger"),
        "{got:?}"
    );
    assert!(closed);
    // The node serves on.
    let mut con = node.client().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    node.shutdown().await;
}

/// One key, three nodes: what one node spent, the others refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_throttle_is_shared_by_the_cluster() {
    let dir = scratch("cluster", 3);
    let first = TestNode::start(&dir, 0, vec![]).await;
    let seed = vec![first.peer.clone()];
    let second = TestNode::start(&dir, 1, seed.clone()).await;
    let third = TestNode::start(&dir, 2, seed).await;
    ready(&[&first, &second, &third]).await;

    let mut a = first.client().await;
    // No rule is needed anywhere: the call carries its limit, and a peer
    // that never saw these parameters holds and confirms the counts on
    // their bucket grid. 5 at once, then one an hour: the burst is all
    // there is.
    for left in (0..5).rev() {
        let r = throttle(&mut a, "shared", &[4, 1, 3600]).await.unwrap();
        assert_eq!(&r[..3], &[0, 5, left]);
    }
    for node in [&second, &third] {
        let mut con = node.client().await;
        let r = throttle(&mut con, "shared", &[4, 1, 3600]).await.unwrap();
        assert_eq!(&r[..3], &[1, 5, 0], "spent on another node: {r:?}");
        // Another key of the same triple is untouched.
        let r = throttle(&mut con, "fresh", &[4, 1, 3600, 0]).await.unwrap();
        assert_eq!(&r[..3], &[0, 5, 5]);
    }
    for n in [first, second, third] {
        n.shutdown().await;
    }
}
