//! A connection flood against a running node, and what a normal client
//! sees meanwhile: `scripts/conn-flood.sh` starts the node and runs this.
//!
//! Holds `FLOOD` connections open to the decision port from `SOURCES`
//! loopback addresses (127.0.1.1, 127.0.1.2, ...): half idle, half
//! slowloris (a request head that never ends, one byte a second). A
//! connection the node closes is opened again at once, so the flood stays
//! at full size. Meanwhile a normal client sends `REQUESTS` checks over
//! one keep-alive connection and `REQUESTS / 10` over fresh connections,
//! and probes `/readyz` on the operations port; it prints their p50, p99
//! and max, and a `result:` line.
//!
//! Environment: TARGET (host:port of the decision port), ADMIN (host:port
//! of the operations port), FLOOD (10000), SOURCES (20), REQUESTS (2000),
//! SETTLE_S (5: seconds to let the flood build before measuring).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drl::http::client::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur
    }
}

/// One flood connection, reopened whenever the node closes it, until `end`.
async fn flooder(
    source: [u8; 4],
    target: SocketAddr,
    slow: bool,
    open: Arc<AtomicUsize>,
    reopened: Arc<AtomicUsize>,
    end: Instant,
) {
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        let socket = match TcpSocket::new_v4().and_then(|s| {
            s.bind(SocketAddr::from((source, 0)))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(mut stream) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        open.fetch_add(1, Ordering::Relaxed);
        if slow {
            let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nx-slow: ").await;
        }
        loop {
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                r = stream.read(&mut buf) => {
                    if matches!(r, Ok(0) | Err(_)) { break; }
                }
                () = tick => {
                    if Instant::now() >= end { break; }
                    if slow && stream.write_all(b"a").await.is_err() { break; }
                }
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
        reopened.fetch_add(1, Ordering::Relaxed);
        // A closed flood connection comes back, but not in a tight loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (us(at(0.5)), us(at(0.99)), us(v[v.len() - 1]))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let target: SocketAddr = env("TARGET", "127.0.0.1:8400".parse().unwrap());
    let admin: SocketAddr = env("ADMIN", "127.0.0.1:8401".parse().unwrap());
    let flood: usize = env("FLOOD", 10_000);
    let sources: usize = env("SOURCES", 20).clamp(1, 250);
    let requests: usize = env("REQUESTS", 2_000);
    let settle = Duration::from_secs(env("SETTLE_S", 5));
    let fds = raise_fd_limit();
    println!("open-file limit {fds}; flood {flood} connections from {sources} addresses");

    let open = Arc::new(AtomicUsize::new(0));
    let reopened = Arc::new(AtomicUsize::new(0));
    // Long enough for the measurements; they end the run, not this.
    let end = Instant::now() + Duration::from_secs(600);
    let mut tasks = Vec::new();
    for i in 0..flood {
        let source = [127, 0, 1, (i % sources) as u8 + 1];
        tasks.push(tokio::spawn(flooder(
            source,
            target,
            i % 2 == 1,
            open.clone(),
            reopened.clone(),
            end,
        )));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(settle).await;
    println!(
        "flood: {} connections open, {} closed by the node so far",
        open.load(Ordering::Relaxed),
        reopened.load(Ordering::Relaxed)
    );

    let body = |i: usize| format!(r#"{{"user":"normal-{}","endpoint":"/v1/search"}}"#, i % 100);
    let mut keepalive = Vec::with_capacity(requests);
    let mut conn = Connection::open_addr(target).await.expect("connect");
    conn.set_timeout(Duration::from_secs(10));
    let mut failed = 0usize;
    for i in 0..requests {
        let t = Instant::now();
        match conn.post_json("/v1/check", &body(i)).await {
            Ok(a) if a.status == 200 || a.status == 429 => keepalive.push(t.elapsed()),
            _ => {
                failed += 1;
                if let Ok(c) = Connection::open_addr(target).await {
                    conn = c;
                }
            }
        }
    }
    let mut fresh = Vec::new();
    let mut probes = Vec::new();
    for i in 0..requests / 10 {
        let t = Instant::now();
        match Connection::open_addr(target).await {
            Ok(mut c) => match c.post_json("/v1/check", &body(i)).await {
                Ok(_) => fresh.push(t.elapsed()),
                Err(_) => failed += 1,
            },
            Err(_) => failed += 1,
        }
        let t = Instant::now();
        match Connection::open_addr(admin).await {
            Ok(mut c) => match c.get("/readyz").await {
                Ok(a) if a.status == 200 => probes.push(t.elapsed()),
                _ => failed += 1,
            },
            Err(_) => failed += 1,
        }
    }
    let still_open = open.load(Ordering::Relaxed);
    let (k50, k99, kmax) = percentiles(keepalive);
    let (f50, f99, fmax) = percentiles(fresh);
    let (p50, p99, pmax) = percentiles(probes);
    println!("keep-alive checks:      p50 {k50:.0} us, p99 {k99:.0} us, max {kmax:.0} us");
    println!("new-connection checks:  p50 {f50:.0} us, p99 {f99:.0} us, max {fmax:.0} us");
    println!("readiness probes:       p50 {p50:.0} us, p99 {p99:.0} us, max {pmax:.0} us");
    println!(
        "result: flood_open={still_open} flood_closed_by_node={} failed={failed} keepalive_p99_us={k99:.0} fresh_p99_us={f99:.0} probe_p99_us={p99:.0}",
        reopened.load(Ordering::Relaxed)
    );
    for t in tasks {
        t.abort();
    }
}
