//! A worker that takes jobs in atomic batches over gRPC and refunds the
//! charges of jobs that failed.
//!
//! Each job is charged to two limits at once: its tenant's and the shared
//! export quota, as one atomic batch (both counted, or neither). A job that
//! then fails gives both charges back by their receipts, so failed work
//! costs no quota.
//!
//! ```sh
//! cargo run --release -- cluster --nodes 3        # in another terminal
//! cargo run -p drl-client --example worker
//! ```
//!
//! `DRL_GRPC_NODES` lists the nodes' gRPC addresses (default: the three of
//! `drl cluster`), `JOBS` how many jobs to run (default 200).
//! `tests/sdk_examples.rs` runs `work` against a real `drl cluster` and
//! checks the cluster's counts against the report.

use std::time::Duration;

use drl_client::{Check, Client, Protocol};

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Jobs admitted and done.
    pub done: u64,
    /// Jobs admitted, failed, and refunded.
    pub refunded: u64,
    /// Jobs the limits refused.
    pub refused: u64,
}

/// Runs `jobs` jobs for `tenants` tenants; every `fail_every`th job fails.
pub async fn work(
    nodes: Vec<String>,
    jobs: u64,
    tenants: u64,
    fail_every: u64,
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    let client = Client::builder()
        .nodes(nodes)
        .protocol(Protocol::Grpc)
        .build()
        .await?;
    let mut report = Report::default();
    for job in 1..=jobs {
        let tenant = format!("tenant-{}", job % tenants);
        let batch = client
            .check_batch(vec![
                Check::new([("endpoint", "/v1/export"), ("tenant", tenant.as_str())]),
                Check::new([("endpoint", "/v1/export"), ("quota", "export")]),
            ])
            .await?;
        if !batch.is_allowed() {
            report.refused += 1;
            continue;
        }
        // The job itself.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if job % fail_every == 0 {
            for d in &batch.decisions {
                if let Some(receipt) = &d.receipt {
                    client.refund(receipt).await?;
                }
            }
            report.refunded += 1;
        } else {
            report.done += 1;
        }
    }
    Ok(report)
}

#[tokio::main]
#[allow(dead_code)]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let nodes = std::env::var("DRL_GRPC_NODES")
        .unwrap_or_else(|_| "127.0.0.1:9400,127.0.0.1:9401,127.0.0.1:9402".into());
    let jobs = std::env::var("JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(200);
    let nodes = nodes.split(',').map(str::to_owned).collect();
    let report = work(nodes, jobs, 5, 10).await?;
    println!(
        "done {}, failed and refunded {}, refused {}",
        report.done, report.refunded, report.refused
    );
    Ok(())
}
