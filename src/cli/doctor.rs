//! `drl doctor`: what a running node or cluster is waiting for, in plain
//! words. For each node named: can it be reached, is it ready (and if not,
//! the reason its `/readyz` gives), which peers it sees, the development
//! defaults it runs with, and how far its peers' clocks are from its own.
//! Everything comes from the node's HTTP API (`/healthz`, `/readyz`,
//! `/metrics`); nothing is changed.

use std::time::Duration;

use super::{runtime, CliError};
use crate::http::client::Connection;

/// `drl doctor`: the nodes to look at.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// Node HTTP addresses (the decision port or the operations port),
    /// comma-separated.
    #[arg(
        long,
        env = "DRL_NODE",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8400"
    )]
    pub node: Vec<String>,
}

/// A peer clock further off than this is worth a line: windows of a
/// second start to disagree between nodes.
const CLOCK_OFFSET_WARN: f64 = 0.1;

/// How long each exchange with a node may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// What one look at one node found: lines to print, and whether any of them
/// needs the operator.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// `ok:`, `warn:` and `problem:` lines, in order.
    pub lines: Vec<String>,
    /// Lines that say something is wrong (`problem:`).
    pub problems: usize,
}

impl Findings {
    fn ok(&mut self, line: String) {
        self.lines.push(format!("  ok: {line}"));
    }
    fn warn(&mut self, line: String) {
        self.lines.push(format!("  warn: {line}"));
    }
    fn problem(&mut self, line: String) {
        self.problems += 1;
        self.lines.push(format!("  problem: {line}"));
    }
}

/// A sample of `/metrics`: `name{labels} value`, labels as written.
fn samples<'a>(metrics: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once('}')?;
                    (labels, value)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// One label's value out of `a="x",b="y"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Reads what a node's `/readyz` body and `/metrics` text say: the
/// findings of [`doctor`] for one node, without the network.
pub fn diagnose(readyz_status: u16, readyz: &serde_json::Value, metrics: &str) -> Findings {
    let mut f = Findings::default();
    if readyz_status == 200 {
        f.ok("ready: admitting requests".into());
    } else {
        let why = readyz["reason"]
            .as_str()
            .unwrap_or("no reason given (an older node)");
        f.problem(format!("not ready: {why}"));
    }
    if let Some(e) = readyz["rules_file_error"].as_str() {
        f.problem(format!(
            "the last reload of the rules file failed (the rules in force stay): {e}"
        ));
    }
    let known = readyz["known_peers"].as_u64().unwrap_or(0);
    let live = readyz["live_peers"].as_u64().unwrap_or(0);
    let peers: Vec<String> = samples(metrics, "drl_peer_connected")
        .into_iter()
        .map(|(labels, v)| {
            let name = label(labels, "peer_name").unwrap_or("?");
            let state = if v > 0.0 {
                "connected"
            } else {
                "not connected"
            };
            format!("{name} {state}")
        })
        .collect();
    let peer_line = format!(
        "peers: {live} live of {known} known{}{}",
        if peers.is_empty() { "" } else { ": " },
        peers.join(", ")
    );
    if live < known {
        f.warn(peer_line);
    } else {
        f.ok(peer_line);
    }
    for (labels, offset) in samples(metrics, "drl_peer_clock_offset_seconds") {
        let name = label(labels, "peer_name").unwrap_or("?");
        if offset.abs() > CLOCK_OFFSET_WARN {
            f.warn(format!(
                "{name}'s clock is {offset:+.3}s from this node's: run NTP (chrony, \
                 systemd-timesyncd) on every node"
            ));
        }
    }
    match samples(metrics, "drl_insecure_defaults").first() {
        Some(&(_, n)) if n > 0.0 => f.warn(format!(
            "{n} development default(s) in use (the node's log names them at start; \
             docs/troubleshooting.md): set DRL_KEY_SEED to 32 random hex digits, the same on \
             every node"
        )),
        Some(_) => f.ok("no development defaults".into()),
        None => {}
    }
    f
}

async fn look_at(url: &str) -> Result<Findings, String> {
    let exchange = async {
        let mut conn = Connection::open(url).await.map_err(|e| e.to_string())?;
        let health = conn.get("/healthz").await.map_err(|e| e.to_string())?;
        if health.status != 200 {
            return Err(format!("/healthz answered {}", health.status));
        }
        let ready = conn.get("/readyz").await.map_err(|e| e.to_string())?;
        let metrics = conn.get("/metrics").await.map_err(|e| e.to_string())?;
        Ok(diagnose(ready.status, &ready.json(), &metrics.text()))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {EXCHANGE_TIMEOUT:?}"))?
}

/// `drl doctor`: prints what each node is waiting for; exits with
/// [`CliError::Attention`] when any node is unreachable or has a problem.
pub fn doctor(args: &DoctorArgs) -> Result<(), CliError> {
    let rt = runtime()?;
    let mut problems = 0;
    for url in &args.node {
        println!("{url}");
        match rt.block_on(look_at(url)) {
            Ok(findings) => {
                for line in &findings.lines {
                    println!("{line}");
                }
                problems += findings.problems;
            }
            Err(e) => {
                problems += 1;
                println!(
                    "  problem: unreachable ({e}): is the node running, and is this its HTTP \
                     address (listen_http or listen_admin)?"
                );
            }
        }
    }
    match problems {
        0 => Ok(()),
        problems => Err(CliError::Attention { problems }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP drl_peer_connected x\n\
        drl_peer_connected{peer=\"1\",peer_name=\"node-1\"} 1\n\
        drl_peer_connected{peer=\"2\",peer_name=\"node-2\"} 0\n\
        drl_peer_clock_offset_seconds{peer=\"1\",peer_name=\"node-1\"} -0.25\n\
        drl_peer_clock_offset_seconds{peer=\"2\",peer_name=\"node-2\"} 0.001\n\
        drl_insecure_defaults 1\n";

    #[test]
    fn a_waiting_node_with_a_skewed_peer_and_the_dev_seed() {
        let readyz = serde_json::json!({
            "ready": false, "reason": "waiting for its peers", "live_peers": 1, "known_peers": 2
        });
        let f = diagnose(503, &readyz, METRICS);
        assert_eq!(f.problems, 1, "{f:?}");
        let text = f.lines.join("\n");
        assert!(
            text.contains("problem: not ready: waiting for its peers"),
            "{text}"
        );
        assert!(
            text.contains("warn: peers: 1 live of 2 known: node-1 connected, node-2 not connected"),
            "{text}"
        );
        assert!(text.contains("node-1's clock is -0.250s"), "{text}");
        assert!(!text.contains("node-2's clock"), "{text}");
        assert!(text.contains("1 development default(s)"), "{text}");
    }

    #[test]
    fn a_healthy_node_has_no_problems() {
        let readyz = serde_json::json!({"ready": true, "live_peers": 0, "known_peers": 0});
        let f = diagnose(200, &readyz, "drl_insecure_defaults 0\n");
        assert_eq!(f.problems, 0);
        assert!(f.lines.iter().all(|l| l.starts_with("  ok:")), "{f:?}");
    }
}
