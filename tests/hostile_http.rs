//! Hostile clients against a real node over real sockets: incomplete and
//! oversized bodies, HEAD on a counting route, impossible costs, and
//! connection floods (idle and slowloris) that must not take the decision
//! port or the health probes down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::http::client::{Answer, Connection};
use drl::http::HttpLimits;
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{NodeApi, NodeFile};
use drl::server::{RunError, Server, ServerLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const RULES: &str = r#"
endpoints = ["/v1/search", "/v1/slide"]

[[rules]]
name = "search"
match = { endpoint = "/v1/search", user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 3, window = "1h" } ]

[[rules]]
name = "slide"
match = { endpoint = "/v1/slide", user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 100, window = "1h" } ]
"#;

fn scratch(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-hostile-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(1)).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    dir
}

struct TestNode {
    addr: SocketAddr,
    admin: SocketAddr,
    api: NodeApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    async fn start(name: &str, limits: ServerLimits) -> TestNode {
        let dir = scratch(name);
        let file = NodeFile {
            recovery_timeout: "100ms".into(),
            listen_admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..NodeFile::local(&dir, 0, vec![])
        };
        let node = Server::start_with_limits(file.settings(&dir).unwrap(), limits)
            .await
            .unwrap();
        let (addr, admin) = (node.http_addr(), node.admin_addr().unwrap());
        let api = node.node().api();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        let n = TestNode {
            addr,
            admin,
            api,
            stop: Some(stop),
            task,
        };
        let start = Instant::now();
        while get(n.admin, "/readyz").await.status != 200 {
            assert!(start.elapsed() < Duration::from_secs(15), "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("shutdown within 15 s")
            .unwrap()
            .unwrap();
    }

    async fn check(&self, body: &str) -> Answer {
        let mut c = Connection::open_addr(self.addr).await.unwrap();
        c.post_json("/v1/check", body).await.unwrap()
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    let mut c = Connection::open_addr(addr).await.unwrap();
    c.set_timeout(Duration::from_secs(10));
    c.get(path).await.unwrap()
}

/// Short timeouts so that the tests see them act; generous deadlines to
/// observe them on a loaded machine.
fn quick_limits() -> ServerLimits {
    ServerLimits {
        http: quick_http(),
        ..ServerLimits::default()
    }
}

fn quick_http() -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    }
}

/// Reads until the peer closes or `deadline` passes; returns what came and
/// whether the peer closed.
async fn read_until_closed(s: &mut TcpStream, deadline: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Issue 10, item 4: a body that never arrives in full is answered 408 and
/// its connection closed, instead of being waited on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_body_times_out_with_408() {
    let node = TestNode::start("incomplete", quick_limits()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"")
        .await
        .unwrap();
    let (text, closed) = read_until_closed(&mut s, Duration::from_secs(20)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(closed, "the connection is closed after a 408");
    assert_eq!(node.api.limiter.keys_tracked(), 0);
    node.shutdown().await;
}

/// Issue 10, item 4: `Expect: 100-continue` with a body over the limit is
/// answered 413 at once, never `100 Continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_expect_continue_gets_an_early_413() {
    let node = TestNode::start("expect", quick_limits()).await;
    for path in ["/v1/check", "/v1/refund"] {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 100000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer without sending the body")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{path}: {text:?}");
        assert!(!text.contains("100 Continue"), "{text:?}");
    }
    // The admin route's larger limit is enforced the same way.
    let mut s = TcpStream::connect(node.admin).await.unwrap();
    s.write_all(
        b"PUT /v1/rules HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 100000000\r\n\r\n",
    )
    .await
    .unwrap();
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    node.shutdown().await;
}

/// Issue 10, item 5: `HEAD /v1/allow` counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_allow_counts_nothing() {
    let node = TestNode::start("head", quick_limits()).await;
    for _ in 0..5 {
        let mut c = Connection::open_addr(node.addr).await.unwrap();
        let a = c
            .request("HEAD", "/v1/allow?user=hal&endpoint=/v1/search", &[], b"")
            .await
            .unwrap();
        assert_eq!(a.status, 405);
        assert_eq!(a.header("allow"), Some("GET"));
    }
    let a = node
        .check(r#"{"user":"hal","endpoint":"/v1/search","cost":0}"#)
        .await;
    assert_eq!(a.json()["remaining"], 3, "{}", a.text());
    node.shutdown().await;
}

/// Issue 10, item 5: a request answered "never" leaves no key behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_creates_no_key_entry() {
    let node = TestNode::start("never", quick_limits()).await;
    for i in 0..20 {
        let a = node
            .check(&format!(
                r#"{{"user":"u{i}","endpoint":"/v1/search","cost":4}}"#
            ))
            .await;
        assert_eq!(a.status, 429);
        assert_eq!(a.json()["outcome"], "never");
    }
    assert_eq!(node.api.limiter.keys_tracked(), 0);
    node.shutdown().await;
}

/// Issue 10, item 6: the first hit of a sliding-window key reports when
/// the window resets, not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sliding_window_hit_has_a_reset_time() {
    let node = TestNode::start("reset", quick_limits()).await;
    for (user, cost, remaining) in [("s1", 1, 99), ("s2", 100, 0)] {
        let a = node
            .check(&format!(
                r#"{{"user":"{user}","endpoint":"/v1/slide","cost":{cost}}}"#
            ))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        let j = a.json();
        assert_eq!(j["remaining"], remaining);
        assert!(j["reset_ms"].as_u64().unwrap() > 0, "{j}");
        let rl = a.header("ratelimit").unwrap();
        assert!(!rl.ends_with(";t=0"), "{rl}");
    }
    node.shutdown().await;
}

/// Raises this process's open-file limit as far as the hard limit allows.
fn raise_fd_limit(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        let target = want.min(l.rlim_max);
        if l.rlim_cur < target {
            l.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        }
        l.rlim_cur
    }
}

async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// Issue 10, item 3, at a size a test can afford: idle connections and
/// slowloris heads from other addresses cannot stop a normal client or the
/// probes, connections over the per-source cap are closed at once, and
/// every flood connection is closed by the head or idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_idle_and_slow_connections_are_shed() {
    const IDLE: usize = 400;
    const SLOW: usize = 40;
    const PER_SOURCE: usize = 100;
    let fds = raise_fd_limit(8192);
    assert!(fds >= 2048, "need at least 2048 open files, have {fds}");
    let node = TestNode::start(
        "flood",
        ServerLimits {
            http: HttpLimits {
                max_per_source: PER_SOURCE,
                ..quick_http()
            },
            ..ServerLimits::default()
        },
    )
    .await;

    // Idle: connect and send nothing.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(connect_from([127, 0, 0, 2], node.addr).await.unwrap());
    }
    // Slowloris: a head that never ends, one byte at a time.
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = connect_from([127, 0, 0, 3], node.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nx-a: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        let mut open = slow.len();
        for _ in 0..40 {
            open = 0;
            for s in slow.iter_mut() {
                if s.write_all(b"a").await.is_ok() {
                    open += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (slow, open)
    });

    // Meanwhile a normal client and the probes are answered.
    for i in 0..20 {
        let a = node
            .check(&format!(r#"{{"user":"ok{i}","endpoint":"/v1/search"}}"#))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(get(node.admin, "/healthz").await.status, 200);
        assert_eq!(get(node.admin, "/readyz").await.status, 200);
        assert_eq!(get(node.addr, "/readyz").await.status, 200);
    }

    // Every idle connection is closed: those over the cap at once, the
    // rest by the head timeout.
    let mut closed = 0;
    for s in idle.iter_mut() {
        let (text, gone) = read_until_closed(s, Duration::from_secs(20)).await;
        assert!(!text.starts_with("HTTP/1.1 2"), "{text:?}");
        closed += usize::from(gone);
    }
    assert_eq!(closed, IDLE, "idle connections left open");
    // Slowloris heads are cut by the head timeout despite their trickle.
    let (mut slow, _) = trickle.await.unwrap();
    let mut cut = 0;
    for s in slow.iter_mut() {
        let (_, gone) = read_until_closed(s, Duration::from_secs(20)).await;
        cut += usize::from(gone);
    }
    assert_eq!(cut, SLOW, "slowloris connections left open");

    // And the node still answers normally afterwards.
    let a = node
        .check(r#"{"user":"after","endpoint":"/v1/search"}"#)
        .await;
    assert_eq!(a.status, 200);
    node.shutdown().await;
}

/// Keep-alive connections that fall idle after a request are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let node = TestNode::start("idle", quick_limits()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (text, closed) = read_until_closed(&mut s, Duration::from_secs(20)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(closed, "an idle keep-alive connection stays open");
    node.shutdown().await;
}
