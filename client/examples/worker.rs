//! A worker that asks before each job, with failover between nodes.
//!
//! ```sh
//! # `drl cluster` stops every node when one dies; to stop just one, start
//! # the nodes from the configurations it wrote (run it once, then Ctrl-C):
//! for i in 0 1 2; do cargo run --release -- node --config /tmp/drl-cluster/node-$i.toml & done
//! cargo run -p drl-client --example worker
//! ```
//!
//! Kill one node while it runs: the worker's calls move to the next nearest
//! node within the same call, and the per-second line shows the failovers
//! and the dead node's breaker opening (and closing once it is back).
//! `DRL_NODES` lists the nodes, `JOBS` how many jobs to run (default 5000).

use std::time::{Duration, Instant};

use drl_client::{Client, DegradedMode, Source};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("DRL_NODES")
        .unwrap_or_else(|_| "127.0.0.1:8400,127.0.0.1:8401,127.0.0.1:8402".into());
    let jobs: u64 = std::env::var("JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(5000);
    let client = Client::builder()
        .nodes(nodes.split(','))
        .degraded(DegradedMode::FailClosed)
        .build()
        .await?;

    let (mut allowed, mut denied, mut degraded) = (0u64, 0u64, 0u64);
    let mut last = Instant::now();
    for job in 0..jobs {
        let user = format!("tenant-{}", job % 5);
        let d = client
            .check(&[("user", user.as_str()), ("endpoint", "/v1/search")], 1)
            .await?;
        match (d.is_allowed(), d.source) {
            (_, Source::Degraded(_)) => degraded += 1,
            (true, _) => allowed += 1,
            (false, _) => denied += 1,
        }
        if d.is_allowed() {
            // The job itself.
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else if let Some(wait) = d.quota.and_then(|q| q.retry_after) {
            tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let states: Vec<String> = client
                .node_states()
                .iter()
                .map(|n| {
                    format!(
                        "{} {} {:?}",
                        n.addr,
                        n.breaker.as_str(),
                        n.latency.unwrap_or_default()
                    )
                })
                .collect();
            println!(
                "allowed {allowed} denied {denied} degraded {degraded} failovers {} | {}",
                client.metrics().failovers.get(),
                states.join(", ")
            );
        }
    }
    Ok(())
}
