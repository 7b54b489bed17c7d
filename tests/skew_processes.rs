//! Clock skew on real processes: a 3-node `drl cluster` whose node 0 runs
//! half a second ahead (its hidden test clock offset). Two users are offered
//! twice the sample rules' 10/s sliding window, spread evenly over the
//! three nodes; a request answered 503 (a node whose clock gate is closed)
//! fails over to the next node, as the SDK does.
//!
//! With the clocks corrected, what the cluster admits is what one exact
//! sliding log of 10 per second admits of it, up to the client's view of
//! the decision times. Uncorrected (the earlier design, the hidden
//! `--test-clock-uncorrected`), this test fails: 16 of 117 admissions
//! (13.7 %) were beyond the log when tried (`scripts/skew.sh` measures
//! both; docs/report.md, "Clock skew").

mod support;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_ports, request, scratch, DRL};

const LIMIT: usize = 10;
const RATE: u64 = 20;
const USERS: usize = 2;
const RUN: Duration = Duration::from_secs(6);

struct Cluster(Child);

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM, so that `drl cluster` stops its children.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn start(offset_ms: i64) -> (Cluster, u16) {
    let dir = scratch("skew");
    let (http, peer, grpc) = (free_ports(3), free_ports(3), free_ports(3));
    let mut child = Command::new(DRL)
        .args(["cluster", "--nodes", "3", "--dir"])
        .arg(&dir)
        .args(["--base-port", &http.to_string()])
        .args(["--peer-base-port", &peer.to_string()])
        .args(["--grpc-base-port", &grpc.to_string()])
        .args(["--admin-token", "tok"])
        .arg(format!("--test-clock-offset=0={offset_ms}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let cluster = Cluster(child);
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the cluster came up");
        if line.contains("Ctrl-C stops the cluster") {
            return (cluster, http);
        }
    }
}

/// Admissions the exact sliding log (at most `LIMIT` in any `(t − 1 s, t]`)
/// refuses, keeping the earliest that fit.
fn beyond_the_log(times: &[Duration]) -> usize {
    let mut kept: VecDeque<Duration> = VecDeque::new();
    let mut refused = 0;
    for &t in times {
        while kept
            .front()
            .is_some_and(|&k| k + Duration::from_secs(1) <= t)
        {
            kept.pop_front();
        }
        if kept.len() < LIMIT {
            kept.push_back(t);
        } else {
            refused += 1;
        }
    }
    refused
}

#[test]
fn a_node_half_a_second_ahead_admits_nothing_beyond_the_algorithm() {
    let (_cluster, http) = start(500);
    let step = Duration::from_nanos(1_000_000_000 / (RATE * USERS as u64));
    let total = (RUN.as_secs() * RATE) as usize * USERS;
    let mut admitted: Vec<Vec<Duration>> = vec![Vec::new(); USERS];
    let start = Instant::now();
    for i in 0..total {
        if let Some(wait) = (step * i as u32).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let user = i % USERS;
        let node = (i / USERS) % 3;
        let body = format!(r#"{{"user":"skew-{user}","endpoint":"/v1/search"}}"#);
        for hop in 0..3 {
            let port = http + ((node + hop) % 3) as u16;
            match request(port, "POST", "/v1/check", &body).map(|(code, _)| code) {
                Some(503) => continue,
                Some(200) => admitted[user].push(start.elapsed()),
                _ => {}
            }
            break;
        }
    }
    let n: usize = admitted.iter().map(Vec::len).sum();
    let beyond: usize = admitted.iter().map(|t| beyond_the_log(t)).sum();
    // The algorithm admits about LIMIT per second per user; its estimator
    // and the client's view of the decision times allow a few more, never
    // the 15 % beyond the log the uncorrected clocks gave.
    assert!(
        n >= USERS * LIMIT * RUN.as_secs() as usize * 8 / 10,
        "admitted only {n}"
    );
    assert!(
        beyond * 100 <= n * 4,
        "{beyond} of {n} admissions beyond an exact 10/s sliding log"
    );
}
