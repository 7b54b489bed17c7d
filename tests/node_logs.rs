//! What a node writes to stderr when it is not a terminal (a container, a
//! service manager, a pipe): no colour codes; one JSON object per line with
//! `--log-format json`; and a shutdown that speaks of a snapshot only when
//! one is configured.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXAMPLE_RULES: &str = include_str!("../deploy/rules.example.toml");

use support::{free_port, DRL};

fn scratch(name: &str) -> PathBuf {
    let dir = support::scratch(&format!("logs-{name}"));
    let out = Command::new(DRL)
        .args(["certs", "--nodes", "1", "--dir"])
        .arg(dir.join("certs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(dir.join("rules.toml"), EXAMPLE_RULES).unwrap();
    dir
}

fn ready(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

/// Runs a one-node cluster until ready, stops it with SIGTERM, and returns
/// everything it wrote to stderr.
fn run_node(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> String {
    let http = free_port();
    let mut cmd = Command::new(DRL);
    cmd.args([
        "node",
        "--name",
        "node-0",
        "--slot",
        "0",
        "--cluster-size",
        "1",
    ])
    .args(["--listen-http", &format!("127.0.0.1:{http}")])
    .args(["--listen-peer", &format!("127.0.0.1:{}", free_port())])
    .arg("--rules")
    .arg(dir.join("rules.toml"))
    .arg("--tls-ca")
    .arg(dir.join("certs/ca.pem"))
    .arg("--tls-cert")
    .arg(dir.join("certs/node-0.pem"))
    .arg("--tls-key")
    .arg(dir.join("certs/node-0-key.pem"))
    .args(["--recovery-timeout", "100ms"])
    .args(extra)
    .env("RUST_LOG", "info")
    .env_remove("DRL_LOG_FORMAT")
    .env_remove("DRL_SNAPSHOT_PATH")
    .env_remove("NO_COLOR")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !ready(http) {
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("node not ready: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{err}");
    err
}

/// The lines from the start of the shutdown on.
fn shutdown_lines(log: &str) -> Vec<&str> {
    log.lines()
        .skip_while(|l| !l.contains("shutting down"))
        .collect()
}

#[test]
fn text_logs_to_a_pipe_have_no_colour_and_no_snapshot_without_one() {
    let dir = scratch("text");
    let log = run_node(&dir, &[], &[]);
    assert!(!log.contains('\u{1b}'), "colour codes in:\n{log}");
    assert!(log.contains("INFO"), "{log}");
    let shutdown = shutdown_lines(&log);
    assert!(
        shutdown.iter().any(|l| l.contains("stopping the node")),
        "{log}"
    );
    for line in &shutdown {
        assert!(
            !line.contains("snapshot") || line.contains("no snapshot configured"),
            "a shutdown without a snapshot path mentions one: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_are_one_object_per_line_and_name_the_snapshot() {
    let dir = scratch("json");
    let snapshot = dir.join("data/node-0.snapshot");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let log = run_node(
        &dir,
        &[],
        &[
            ("DRL_LOG_FORMAT", "json".to_owned()),
            ("DRL_SNAPSHOT_PATH", snapshot.display().to_string()),
        ],
    );
    assert!(!log.contains('\u{1b}'), "colour codes in:\n{log}");
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["target"].is_string(), "{line}");
        messages.push((
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            v["fields"]["snapshot"].as_str().map(str::to_owned),
        ));
    }
    let stop = messages
        .iter()
        .find(|(m, _)| m.starts_with("stopping the node"))
        .unwrap_or_else(|| panic!("no shutdown line in:\n{log}"));
    assert!(stop.0.contains("snapshot"), "{stop:?}");
    assert_eq!(
        stop.1.as_deref(),
        Some(snapshot.display().to_string().as_str())
    );
    assert!(snapshot.exists(), "the snapshot the log names was written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(DRL)
        .args(["node", "--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log-format") && err.contains("json"),
        "{err}"
    );
}

#[test]
fn the_development_admin_token_is_refused_unless_allowed_and_then_warned_about() {
    let out = Command::new(DRL)
        .args(["node", "--admin-token", "change-me"])
        .env_remove("DRL_ALLOW_DEV_ADMIN_TOKEN")
        .env_remove("DRL_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("development token") && err.contains("allow_dev_admin_token"),
        "{err}"
    );

    let dir = scratch("dev-token");
    let log = run_node(
        &dir,
        &["--admin-token", "change-me", "--allow-dev-admin-token"],
        &[],
    );
    let warning = log
        .lines()
        .find(|l| l.contains("INSECURE DEVELOPMENT DEFAULT"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("change-me"),
        "{warning}"
    );
    let quiet = run_node(&dir, &["--admin-token", "0123456789abcdef"], &[]);
    assert!(!quiet.contains("INSECURE"), "{quiet}");
    let _ = std::fs::remove_dir_all(&dir);
}
