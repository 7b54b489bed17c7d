//! `drl cluster add`: one more node for a running local cluster.
//!
//! The cluster's size is its membership, not configuration, so growing a
//! `drl cluster` needs no restart of the nodes that run: this command takes
//! the next free slot in `--dir`, issues that node's certificate with the
//! cluster's CA (kept in `<dir>/certs`), writes its config from node 0's
//! (ports shifted by the slot, every existing node as a seed) and runs the
//! node in the foreground. The node joins, recovers the counts it needs and
//! admits; on Ctrl-C or SIGTERM it stops cleanly, and the others forget it
//! at once (its counts stay in every counter).

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::Child;
use std::time::Instant;

use super::cluster::{cluster_dir_of, ports_taken, spawn, stop_all, Proto};
use super::{runtime, CliError, ShutdownSignal};
use crate::http::client::Connection;
use crate::node::NodeFile;

/// `drl cluster add`: where the running cluster's files are.
#[derive(Debug, Clone, clap::Args)]
pub struct AddArgs {
    /// The folder `drl cluster` was started with (default: `drl-cluster`
    /// in the system's temporary folder, as for `drl cluster`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// What is known of the nodes already in `dir`: `(slot, file)` sorted.
fn existing_nodes(dir: &Path) -> Result<Vec<(u16, NodeFile)>, CliError> {
    let mut nodes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_node = stem
            .strip_prefix("node-")
            .is_some_and(|n| n.parse::<u16>().is_ok());
        if is_node && path.extension().is_some_and(|e| e == "toml") {
            let file = NodeFile::load(&path)?;
            nodes.push((file.slot, file));
        }
    }
    nodes.sort_by_key(|(slot, _)| *slot);
    Ok(nodes)
}

/// Replaces the value of `key` on its own line of a config written by
/// `drl cluster` (the line is added when missing).
fn set_line(text: &str, key: &str, value: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|line| {
            if line.split('=').next().is_some_and(|k| k.trim() == key) {
                found = true;
                format!("{key} = {value}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !found {
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The config of node `slot`, from node 0's text and settings.
fn config_for(
    base_text: &str,
    base: &NodeFile,
    slot: u16,
    seeds: &[String],
) -> Result<(String, String), CliError> {
    let shift = |port: u16| {
        port.checked_add(slot)
            .ok_or_else(|| CliError::Usage(format!("no port {port} + {slot}")))
    };
    let name = format!("node-{slot}");
    let http = format!("127.0.0.1:{}", shift(base.listen_http.port())?);
    let mut text = base_text
        .lines()
        .filter(|l| !l.starts_with("test_clock"))
        .collect::<Vec<_>>()
        .join("\n");
    text = set_line(&text, "name", &quoted(&name));
    text = set_line(&text, "slot", &slot.to_string());
    text = set_line(
        &text,
        "listen_peer",
        &quoted(&format!("127.0.0.1:{}", shift(base.listen_peer.port())?)),
    );
    text = set_line(&text, "listen_http", &quoted(&http));
    if let Some(grpc) = base.grpc_listen {
        text = set_line(
            &text,
            "grpc_listen",
            &quoted(&format!("127.0.0.1:{}", shift(grpc.port())?)),
        );
    }
    if let Some(resp) = base.resp_listen {
        text = set_line(
            &text,
            "resp_listen",
            &quoted(&format!("127.0.0.1:{}", shift(resp.port())?)),
        );
    }
    let seeds: Vec<String> = seeds.iter().map(|s| quoted(s)).collect();
    text = set_line(&text, "seeds", &format!("[{}]", seeds.join(", ")));
    text = set_line(
        &text,
        "snapshot_path",
        &quoted(&format!("data/{name}.snapshot")),
    );
    text = set_line(&text, "tls_cert", &quoted(&format!("certs/{name}.pem")));
    text = set_line(&text, "tls_key", &quoted(&format!("certs/{name}-key.pem")));
    Ok((text, format!("http://{http}")))
}

/// `drl cluster add`: issues, writes and runs the next node until a signal.
pub fn run_add(args: &AddArgs) -> Result<(), CliError> {
    let dir = std::path::absolute(cluster_dir_of(args.dir.as_ref()))?;
    let nodes = existing_nodes(&dir).map_err(|e| {
        CliError::Usage(format!(
            "{}: no cluster files here ({e}); start one with `drl cluster --dir {}` first",
            dir.display(),
            dir.display()
        ))
    })?;
    let Some((_, base)) = nodes.iter().find(|(slot, _)| *slot == 0) else {
        return Err(CliError::Usage(format!(
            "{}: no node-0.toml; start a cluster with `drl cluster --dir {}` first",
            dir.display(),
            dir.display()
        )));
    };
    let slot = nodes
        .last()
        .map_or(0, |(s, _)| *s)
        .checked_add(1)
        .ok_or_else(|| CliError::Usage("every slot is taken".into()))?;
    let base_text = std::fs::read_to_string(dir.join("node-0.toml"))?;
    let seeds: Vec<String> = nodes
        .iter()
        .map(|(_, f)| f.listen_peer.to_string())
        .collect();
    let (text, url) = config_for(&base_text, base, slot, &seeds)?;
    let config = dir.join(format!("node-{slot}.toml"));
    // Check everything before anything is written: the ports, the file.
    let file: NodeFile = toml::from_str(&text)
        .map_err(|e| CliError::Usage(format!("the new node's config: {e}")))?;
    let mut ports = vec![
        (Proto::Tcp, file.listen_http.port(), "HTTP"),
        (Proto::Udp, file.listen_peer.port(), "peer"),
    ];
    ports.extend(file.grpc_listen.map(|a| (Proto::Tcp, a.port(), "gRPC")));
    ports.extend(file.resp_listen.map(|a| (Proto::Tcp, a.port(), "RESP")));
    let taken = ports_taken(&ports);
    if !taken.is_empty() {
        return Err(CliError::Usage(format!(
            "node-{slot}'s ports are in use: {}",
            taken.join(", ")
        )));
    }
    let spec = crate::net::NodeCertSpec {
        name: format!("node-{slot}"),
        slot,
        hosts: vec![],
    };
    crate::net::issue_dev_cert(&dir.join("certs"), &spec)?;
    std::fs::write(&config, &text)?;
    file.settings(&dir)?;

    let exe = std::env::current_exe()?;
    let rt = runtime()?;
    let mut signal = {
        let _entered = rt.enter();
        ShutdownSignal::new()?
    };
    let mut children = vec![spawn(&exe, &config)?];
    let outcome = rt.block_on(async {
        tokio::select! {
            r = wait_ready(&url, &mut children, Duration::from_secs(60), None) => r?,
            () = signal.recv() => return Ok(()),
        }
        outln!(
            "\nnode-{slot} joined the cluster in {}: {url}",
            dir.display()
        );
        outln!("Ctrl-C stops it; it leaves the cluster cleanly.");
        loop {
            tokio::select! {
                () = signal.recv() => break Ok::<_, CliError>(()),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Some(status) = children[0].try_wait()? {
                        break Err(CliError::Usage(format!("node-{slot} exited ({status})")));
                    }
                }
            }
        }
    });
    errln!("stopping node-{slot}...");
    stop_all(&mut children, Duration::from_secs(15));
    outcome
}

/// Waits until the node at `url` answers `/readyz` with 200 and, with
/// `members`, counts that many members (itself included): a node admits
/// once the members it knows of answered, and the rest of the cluster can
/// reach it a few ms later.
pub(super) async fn wait_ready(
    url: &str,
    children: &mut [Child],
    timeout: Duration,
    members: Option<usize>,
) -> Result<(), CliError> {
    let want = members.map(|n| format!("\"members\":{n},"));
    let start = Instant::now();
    loop {
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                return Err(CliError::Usage(format!(
                    "a node exited before the cluster was ready ({status})"
                )));
            }
        }
        if let Ok(mut conn) = Connection::open(url).await {
            if let Ok(a) = conn.get("/readyz").await {
                let counted = want
                    .as_ref()
                    .is_none_or(|w| String::from_utf8_lossy(&a.body).contains(w.as_str()));
                if a.status == 200 && counted {
                    return Ok(());
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(CliError::Usage(format!(
                "{url} not ready after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_node_takes_node_0s_config_with_its_own_slot_ports_and_seeds() {
        let base_text = "# Written by `drl cluster`\nname = \"node-0\"\nslot = 0\n\
            listen_peer = \"127.0.0.1:7400\"\nlisten_http = \"127.0.0.1:8400\"\n\
            grpc_listen = \"127.0.0.1:9400\"\nseeds = [\"127.0.0.1:7401\"]\n\
            snapshot_path = \"data/node-0.snapshot\"\ntls_cert = \"certs/node-0.pem\"\n\
            tls_key = \"certs/node-0-key.pem\"\ntest_clock_offset_ms = 5\nadmin_token = \"t\"\n";
        let base: NodeFile = toml::from_str(base_text).unwrap();
        let seeds = ["127.0.0.1:7400".to_owned(), "127.0.0.1:7401".to_owned()];
        let (text, url) = config_for(base_text, &base, 2, &seeds).unwrap();
        let file: NodeFile = toml::from_str(&text).unwrap();
        assert_eq!((file.name.as_str(), file.slot), ("node-2", 2));
        assert_eq!(file.listen_peer.port(), 7402);
        assert_eq!(file.listen_http.port(), 8402);
        assert_eq!(file.grpc_listen.map(|a| a.port()), Some(9402));
        assert_eq!(file.seeds, seeds);
        assert_eq!(file.tls_cert, PathBuf::from("certs/node-2.pem"));
        assert_eq!(file.test_clock_offset_ms, 0, "a test offset is not copied");
        assert_eq!(file.admin_token.as_deref(), Some("t"));
        assert_eq!(url, "http://127.0.0.1:8402");
    }
}
