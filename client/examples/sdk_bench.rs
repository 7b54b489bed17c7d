//! Measures the SDK against a real 3-node `drl cluster` that it starts
//! itself: gRPC batches of 10 at half the client's peak rate, single checks
//! over gRPC and HTTP side by side, failover when the nearest node is killed
//! (`kill -9`), and each degraded mode through a 10 s full-cluster outage.
//! `scripts/sdk-bench.sh` builds and runs it; docs/report.md, "Client SDK",
//! has the figures.
//!
//! ```sh
//! cargo build --release --bin drl
//! DRL_BIN=target/release/drl cargo run --release -p drl-client --features grpc --example sdk_bench
//! ```
//!
//! `DRL_BIN` is the `drl` binary (default `target/release/drl`), `PHASES`
//! a comma-separated subset of `batch,single,failover,outage` (default all),
//! `SECONDS` the length of each timed run (default 5), `FAILOVER_RATE`
//! the checks per second of the failover run (default 200).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drl_client::{
    Check, Client, ClientConfig, ClientError, DegradedMode, Fallback, GrpcTransport, HttpTransport,
    LeaseConfig, RetryPolicy, Source, Wire,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

const HTTP: u16 = 18400;
const PEER: u16 = 17400;
const GRPC: u16 = 19400;
const RESP: u16 = 16400;

const RULES: &str = r#"
# sdk-bench
[[rules]]
name = "bench"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "fixed_window", limit = 100000000, window = "1h" } ]
"#;

/// A `drl cluster` child process.
struct LocalCluster {
    child: Child,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    fn start(bin: &str, dir: &std::path::Path) -> Result<LocalCluster, Error> {
        let mut child = Command::new(bin)
            .args(["cluster", "--nodes", "3", "--dir"])
            .arg(dir)
            .args(["--base-port", &HTTP.to_string()])
            .args(["--peer-base-port", &PEER.to_string()])
            .args(["--grpc-base-port", &GRPC.to_string()])
            .args(["--resp-base-port", &RESP.to_string()])
            .args(["--admin-token", "tok"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Ctrl-C stops the cluster") => break,
                Some(Ok(_)) => {}
                _ => return Err("the cluster did not come up".into()),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(LocalCluster {
            child,
            dir: dir.to_owned(),
        })
    }

    /// Stops every node cleanly (drain, final delta, snapshot).
    fn stop(mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }

    /// The process id of node `slot`, by its command line.
    fn node_pid(&self, slot: u16) -> Option<u32> {
        let config = self.dir.join(format!("node-{slot}.toml"));
        let config = config.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "node") && args.iter().any(|a| a.ends_with(&config)) {
                return Some(pid);
            }
        }
        None
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// One HTTP/1.1 request with the admin token: status and body.
fn admin(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer tok\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((code, body))
}

fn put_rules(rules: &str, marker: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, _)) = admin(HTTP, "PUT", "/v1/rules", rules) {
            break;
        }
        if Instant::now() > deadline {
            return Err("rules not accepted".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for port in HTTP..HTTP + 3 {
        while !admin(port, "GET", "/v1/rules", "").is_some_and(|(_, b)| b.contains(marker)) {
            if Instant::now() > deadline {
                return Err(format!("rules not in force on {port}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin(port, "GET", "/readyz", "").map(|r| r.0) != Some(200) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster-wide count of `user` under the bench rule, read on `port`.
fn counted(port: u16, user: &str) -> Option<u64> {
    let (code, body) = admin(
        port,
        "POST",
        "/v1/counters",
        &format!(r#"{{"user":"{user}"}}"#),
    )?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["counters"][0]["count"].as_u64()
}

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)]
}

fn config(retry: RetryPolicy, degraded: DegradedMode) -> ClientConfig {
    ClientConfig {
        retry,
        degraded,
        ..ClientConfig::default()
    }
}

fn grpc_client(config: ClientConfig) -> Result<Client, Error> {
    let nodes = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], GRPC + i)))
        .collect();
    Ok(Client::with_nodes(
        nodes,
        config,
        Wire::Grpc(GrpcTransport::new()),
    )?)
}

fn http_client(config: ClientConfig) -> Result<Client, Error> {
    let nodes = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], HTTP + i)))
        .collect();
    let t = HttpTransport::new(config.attempt_timeout, config.max_batch);
    Ok(Client::with_nodes(nodes, config, Wire::Http(t))?)
}

fn batch_of_ten(seed: u64) -> Vec<Check> {
    (0..10)
        .map(|i| {
            let user = format!("b{}", (seed * 10 + i) % 10_000);
            Check::new([("user", user)])
        })
        .collect()
}

/// Closed loop: `concurrency` tasks calling `f` for `secs`; calls per second.
async fn closed_loop<F, Fut>(concurrency: usize, secs: u64, f: F) -> (f64, Vec<Duration>)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (stop, samples, calls, f) =
                (stop.clone(), samples.clone(), calls.clone(), f.clone());
            tokio::spawn(async move {
                let mut local = Vec::new();
                let mut n = t as u64 * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    if f(n).await {
                        local.push(t0.elapsed());
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                samples.lock().unwrap().extend(local);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let rate = calls.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let samples = samples.lock().unwrap().clone();
    (rate, samples)
}

/// Open loop: `f` started `rate` times a second for `secs`, each in its
/// own task; latencies of those that returned true, and the failures.
async fn open_loop<F, Fut>(rate: f64, secs: u64, f: F) -> (Vec<Duration>, u64)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let every = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let total = (rate * secs as f64) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    for n in 0..total {
        tokio::time::sleep_until(start + every.mul_f64(n as f64)).await;
        let (samples, failed, f) = (samples.clone(), failed.clone(), f.clone());
        handles.push(tokio::spawn(async move {
            let t0 = Instant::now();
            if f(n).await {
                samples.lock().unwrap().push(t0.elapsed());
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let s = samples.lock().unwrap().clone();
    (s, failed.load(Ordering::Relaxed))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Deadlines far above a loaded machine's hiccups, so that a timed-out
/// attempt does not open a breaker and turn the rest of a run into
/// degraded decisions: these phases measure the nodes' answers.
fn patient() -> ClientConfig {
    ClientConfig {
        attempt_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(4),
        ..ClientConfig::default()
    }
}

fn on_node(d: &drl_client::Decision) -> bool {
    matches!(d.source, Source::Node(_))
}

async fn phase_batch(secs: u64) -> Result<(), Error> {
    let client = grpc_client(patient())?;
    // Warm the connections and the EWMA.
    for i in 0..200 {
        client.check_batch(batch_of_ten(i)).await?;
    }
    let c = client.clone();
    let (peak, _) = closed_loop(32, secs, move |n| {
        let c = c.clone();
        async move {
            c.check_batch(batch_of_ten(n))
                .await
                .is_ok_and(|b| b.decisions.iter().all(on_node))
        }
    })
    .await;
    let c = client.clone();
    let (mut lat, failed) = open_loop(peak / 2.0, secs * 2, move |n| {
        let c = c.clone();
        async move {
            c.check_batch(batch_of_ten(n))
                .await
                .is_ok_and(|b| b.is_allowed() && b.decisions.iter().all(on_node))
        }
    })
    .await;
    println!(
        "batch10 grpc: peak {peak:.0} batches/s (32 in flight); at {:.0}/s: {} batches, {failed} failed, p50 {}, p99 {}, p99.9 {}, max {}",
        peak / 2.0,
        lat.len(),
        ms(pct(&mut lat, 0.5)),
        ms(pct(&mut lat, 0.99)),
        ms(pct(&mut lat, 0.999)),
        ms(pct(&mut lat, 1.0)),
    );
    Ok(())
}

async fn phase_single(secs: u64) -> Result<(), Error> {
    let mut rows = BTreeMap::new();
    for (name, client) in [
        ("grpc", grpc_client(patient())?),
        ("http", http_client(patient())?),
    ] {
        for i in 0..200 {
            client.check(&[("user", &format!("s{i}"))], 1).await?;
        }
        let mut row = Vec::new();
        for concurrency in [1usize, 32] {
            let c = client.clone();
            let (rate, mut lat) = closed_loop(concurrency, secs, move |n| {
                let c = c.clone();
                async move {
                    let user = format!("s{}", n % 10_000);
                    c.check(&[("user", &user)], 1)
                        .await
                        .is_ok_and(|d| on_node(&d))
                }
            })
            .await;
            row.push((concurrency, rate, pct(&mut lat, 0.5), pct(&mut lat, 0.99)));
        }
        rows.insert(name, row);
    }
    for (name, row) in &rows {
        for (c, rate, p50, p99) in row {
            println!(
                "single {name}: {c} in flight: {rate:.0} checks/s, p50 {}, p99 {}",
                ms(*p50),
                ms(*p99)
            );
        }
    }
    let (g, h) = (&rows["grpc"], &rows["http"]);
    println!(
        "single grpc/http: p50 at 1 in flight {:.2}x, rate at 32 in flight {:.2}x",
        g[0].2.as_secs_f64() / h[0].2.as_secs_f64(),
        g[1].1 / h[1].1
    );
    Ok(())
}

async fn phase_failover(cluster: &LocalCluster, retry: RetryPolicy) -> Result<(), Error> {
    let client = grpc_client(config(retry, DegradedMode::FailClosed))?;
    let user = format!("failover-{retry:?}").to_lowercase();
    for _ in 0..300 {
        client.check(&[("user", "warm")], 0).await?;
    }
    let states = client.node_states();
    let nearest = states
        .iter()
        .filter(|n| n.latency.is_some())
        .min_by_key(|n| n.latency)
        .map(|n| n.addr)
        .ok_or("no node measured")?;
    let slot = nearest.port() - GRPC;
    let pid = cluster
        .node_pid(slot)
        .ok_or("no pid for the nearest node")?;
    let admitted = Arc::new(AtomicU64::new(0));
    let indeterminate = Arc::new(AtomicU64::new(0));
    let degraded = Arc::new(AtomicU64::new(0));
    let timeline = Arc::new(Mutex::new(Vec::<(Duration, Duration)>::new()));
    let origin = Instant::now();
    let rate: f64 = std::env::var("FAILOVER_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200.0);
    let secs = 6;
    let kill_at = Duration::from_secs(2);
    let killer = tokio::spawn(async move {
        tokio::time::sleep(kill_at).await;
        signal(pid, "KILL");
    });
    let (c, a, i, d, tl) = (
        client.clone(),
        admitted.clone(),
        indeterminate.clone(),
        degraded.clone(),
        timeline.clone(),
    );
    let (_, _) = open_loop(rate, secs, move |_| {
        let (c, a, i, d, tl, user) = (
            c.clone(),
            a.clone(),
            i.clone(),
            d.clone(),
            tl.clone(),
            user.clone(),
        );
        async move {
            let started = origin.elapsed();
            let t0 = Instant::now();
            let r = c.check(&[("user", &user)], 1).await;
            tl.lock().unwrap().push((started, t0.elapsed()));
            match r {
                Ok(dec) if matches!(dec.source, Source::Degraded(_)) => {
                    d.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Ok(dec) => {
                    if dec.is_allowed() {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
                Err(ClientError::Indeterminate { .. }) => {
                    i.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let _ = killer.await;
    let mut during: Vec<Duration> = timeline
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s >= kill_at && *s < kill_at + Duration::from_secs(1))
        .map(|(_, l)| *l)
        .collect();
    let mut all: Vec<Duration> = timeline.lock().unwrap().iter().map(|(_, l)| *l).collect();
    // Counts replicate within a few sync intervals; the killed node is
    // started again by `drl cluster` and recovers its slot from its peers.
    let survivor = HTTP + (slot + 1) % 3;
    let user = format!("failover-{retry:?}").to_lowercase();
    let mut server = None;
    for _ in 0..50 {
        server = counted(survivor, &user);
        if server == Some(admitted.load(Ordering::Relaxed)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "failover {retry:?}: killed node-{slot} (nearest) at 2 s of a {rate:.0}/s load; {} calls, admitted {}, indeterminate {}, degraded {}; calls started in the second after the kill: {}, p99 {}, max {}; all calls p99 {}; server count {:?} vs client admits {}",
        all.len(),
        admitted.load(Ordering::Relaxed),
        indeterminate.load(Ordering::Relaxed),
        degraded.load(Ordering::Relaxed),
        during.len(),
        ms(pct(&mut during, 0.99)),
        ms(pct(&mut during, 1.0)),
        ms(pct(&mut all, 0.99)),
        server,
        admitted.load(Ordering::Relaxed),
    );
    wait_ready(HTTP + slot);
    Ok(())
}

async fn phase_outage(
    bin: &str,
    dir: &std::path::Path,
    cluster: LocalCluster,
) -> Result<(), Error> {
    let mut cluster = Some(cluster);
    let modes = [
        ("fail_open", DegradedMode::FailOpen),
        ("fail_closed", DegradedMode::FailClosed),
        (
            "local",
            DegradedMode::Local {
                otherwise: Fallback::Deny,
            },
        ),
    ];
    for (name, mode) in modes {
        let lease = LeaseConfig::default();
        let client = grpc_client(ClientConfig {
            lease,
            ..config(RetryPolicy::Safe, mode)
        })?;
        let user = format!("outage-{name}");
        // Hot while the cluster answers: 100 calls/s for 3 s.
        for _ in 0..300 {
            client.check(&[("user", &user)], 1).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lease_held = client.lease_of(&[("user", &user)]);
        if let Some(c) = cluster.take() {
            c.stop();
        }
        let mut admitted = 0u64;
        let mut calls = 0u64;
        let mut errors = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match client.check(&[("user", &user)], 1).await {
                Ok(d) if d.is_allowed() => admitted += 1,
                Ok(_) => {}
                Err(_) => errors += 1,
            }
            calls += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let promise = match mode {
            DegradedMode::FailOpen => "every call".to_owned(),
            DegradedMode::FailClosed => "none".to_owned(),
            DegradedMode::Local { .. } => format!(
                "at most the lease held when cut off: {:?} (left, granted)",
                lease_held
            ),
        };
        println!(
            "outage {name}: 10 s with every node stopped: {calls} calls, {admitted} admitted, {errors} errors; promised: {promise}"
        );
        let c = LocalCluster::start(bin, dir)?;
        for port in HTTP..HTTP + 3 {
            wait_ready(port);
        }
        cluster = Some(c);
        // The client finds the cluster again; its lease is not spent while
        // nodes answer.
        let start = Instant::now();
        loop {
            let d = client.check(&[("user", &user)], 0).await;
            if d.as_ref()
                .is_ok_and(|d| matches!(d.source, Source::Node(_)))
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                println!("outage {name}: the client did not find the cluster again");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "outage {name}: nodes answer again after restart; client back on a node in {:?}; lease now {:?}",
            start.elapsed(),
            client.lease_of(&[("user", &user)])
        );
        client.shutdown().await;
    }
    if let Some(c) = cluster {
        c.stop();
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let bin = std::env::var("DRL_BIN").unwrap_or_else(|_| "target/release/drl".into());
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "batch,single,failover,outage".into());
    let secs: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("drl-sdk-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cluster = LocalCluster::start(&bin, &dir)?;
    put_rules(RULES, "sdk-bench")?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "3-node drl cluster ({bin}); load average before: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let result = async {
        if phases.contains("batch") {
            phase_batch(secs).await?;
        }
        if phases.contains("single") {
            phase_single(secs).await?;
        }
        if phases.contains("failover") {
            phase_failover(&cluster, RetryPolicy::Safe).await?;
            phase_failover(&cluster, RetryPolicy::AtLeastOnce).await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = result {
        cluster.stop();
        return Err(e);
    }
    if phases.contains("outage") {
        phase_outage(&bin, &dir, cluster).await?;
    } else {
        cluster.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
