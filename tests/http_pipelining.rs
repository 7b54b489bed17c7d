//! HTTP/1.1 pipelining (several requests in one write, answered in order)
//! and HTTP/2 with prior knowledge (h2c) on the HTTP API's port, against a
//! real node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{NodeApi, NodeFile};
use drl::server::{RunError, Server};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1h" } ]
"#;

struct TestNode {
    addr: SocketAddr,
    api: NodeApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    async fn start(http2: bool) -> TestNode {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "drl-pipelining-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        generate_dev_certs(&dir.join("certs"), &local_cluster_specs(1)).unwrap();
        std::fs::write(dir.join("rules.toml"), RULES).unwrap();
        let file = NodeFile {
            recovery_timeout: "100ms".into(),
            http2,
            ..NodeFile::local(&dir, 0, vec![])
        };
        let node = Server::start(file.settings(&dir).unwrap()).await.unwrap();
        let addr = node.http_addr();
        let api = node.node().api();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        let start = Instant::now();
        while !api.is_ready() {
            assert!(start.elapsed() < Duration::from_secs(15), "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestNode {
            addr,
            api,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// Reads until `count` responses (by their status lines) have arrived.
async fn read_responses(s: &mut TcpStream, count: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        let complete = text.matches("HTTP/1.1 ").count() >= count && text.ends_with('}');
        if complete {
            return text;
        }
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return text,
        }
    }
}

fn check_request(user: &str, cost: u32) -> String {
    let body = format!("{{\"user\":\"{user}\",\"cost\":{cost}}}");
    format!(
        "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn pipelining_in_order(http2: bool) {
    let node = TestNode::start(http2).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    // Six requests in one write: costs 1, 1, 2, 1 on one key, then a
    // request on another key, then one the first key can no longer take.
    let batch: String = [
        check_request("alice", 1),
        check_request("alice", 1),
        check_request("alice", 2),
        check_request("alice", 1),
        check_request("bob", 1),
        check_request("alice", 1),
    ]
    .concat();
    s.write_all(batch.as_bytes()).await.unwrap();
    let text = read_responses(&mut s, 6).await;
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(
        statuses,
        ["200", "200", "200", "200", "200", "429"],
        "{text}"
    );
    let remaining: Vec<&str> = text
        .match_indices("\"remaining\":")
        .map(|(i, _)| {
            let rest = &text[i + 12..];
            &rest[..rest.find([',', '}']).unwrap()]
        })
        .collect();
    assert_eq!(
        remaining,
        ["4", "3", "1", "0", "4", "0"],
        "in order: {text}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_pipelined_requests_are_answered_in_order() {
    pipelining_in_order(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_pipelining_still_works_with_http2_on() {
    pipelining_in_order(true).await;
}

async fn h2_check(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    user: &str,
) -> (u16, String) {
    let req = hyper::Request::post("http://localhost/v1/check")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"user\":\"{user}\"}}"))))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.version(), hyper::Version::HTTP_2);
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_when_enabled() {
    let node = TestNode::start(true).await;
    let io = TokioIo::new(TcpStream::connect(node.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for left in (0..5).rev() {
        let (status, body) = h2_check(&mut sender, "carol").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"remaining\":{left}")), "{body}");
    }
    let (status, _) = h2_check(&mut sender, "carol").await;
    assert_eq!(status, 429);
    // Concurrent streams on one connection, each decided once.
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = sender.clone();
        streams.push(tokio::spawn(
            async move { h2_check(&mut s, "dave").await.0 },
        ));
    }
    let mut statuses = Vec::new();
    for s in streams {
        statuses.push(s.await.unwrap());
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let (status, _) = h2_check(&mut sender, "dave").await;
    assert_eq!(status, 429, "the five streams were counted");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_off_by_default() {
    let node = TestNode::start(false).await;
    let io = TokioIo::new(TcpStream::connect(node.addr).await.unwrap());
    let handshake =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), io);
    // HTTP/1.1 only: the preface is a bad request, and no stream succeeds.
    let failed = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Ok(Ok((mut sender, conn))) => {
            tokio::spawn(conn);
            let req = hyper::Request::get("http://localhost/healthz")
                .body(Full::new(Bytes::new()))
                .unwrap();
            sender.send_request(req).await.is_err()
        }
        _ => true,
    };
    assert!(failed, "no HTTP/2 without the option");
    assert!(node.api.is_ready());
    node.shutdown().await;
}

/// Everything the server writes until it closes the connection (or 10 s).
async fn read_until_closed(s: &mut TcpStream) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

fn statuses(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect()
}

async fn valid_requests_then_garbage(http2: bool, garbage: &str) {
    let node = TestNode::start(http2).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let batch = [
        check_request("carol", 1),
        check_request("carol", 1),
        garbage.to_owned(),
    ]
    .concat();
    s.write_all(batch.as_bytes()).await.unwrap();
    let (text, closed) = read_until_closed(&mut s).await;
    assert_eq!(
        statuses(&text),
        ["200", "200", "400"],
        "{garbage:?}: {text}"
    );
    assert!(
        closed,
        "{garbage:?}: the connection stays open after the 400: {text}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_requests_followed_by_garbage_are_answered_then_400_then_close() {
    for garbage in [
        "GARBAGE\r\n\r\n",
        "\x00\x01\x02 not http at all\r\n\r\n",
        "GET /v1/allow?user=x HTTP/1.1\r\nbad header line\r\n\r\n",
    ] {
        valid_requests_then_garbage(false, garbage).await;
        valid_requests_then_garbage(true, garbage).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_heads_get_a_400_not_a_silent_close() {
    let node = TestNode::start(false).await;
    for head in [
        "GARBAGE\r\n\r\n",
        "GET\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
        "GET / HTTP/1.1\r\nno-colon\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        "G\x01T / HTTP/1.1\r\n\r\n",
        "GET /\x7f HTTP/1.1\r\n\r\n",
        "\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nhost x\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let (text, closed) = read_until_closed(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{head:?}: {text:?}");
        assert!(closed, "{head:?}: not closed after the 400");
    }
    node.shutdown().await;
}
