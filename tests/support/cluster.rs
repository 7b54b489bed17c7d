//! A `drl cluster` of three real child processes with HTTP, gRPC and RESP
//! listeners and the admin token `tok`, for tests that need the product as
//! a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_ports, request, scratch, DRL};

/// A `drl cluster` of three child processes, stopped on drop.
pub struct LocalCluster {
    child: Child,
    /// HTTP port of node 0; node i listens on `http + i`.
    pub http: u16,
    /// gRPC port of node 0.
    pub grpc: u16,
    /// RESP port of node 0.
    pub resp: u16,
    /// The cluster's directory (`node-<i>.toml` are its nodes' configs).
    pub dir: std::path::PathBuf,
}

impl LocalCluster {
    pub fn start(name: &str) -> LocalCluster {
        Self::start_with(name, Stdio::null(), "warn")
    }

    /// A cluster whose nodes log at `filter` (a `RUST_LOG` value) into
    /// `log`.
    pub fn start_logged(name: &str, log: &std::path::Path, filter: &str) -> LocalCluster {
        Self::start_with(name, super::log_file(log), filter)
    }

    fn start_with(name: &str, stderr: Stdio, filter: &str) -> LocalCluster {
        let dir = scratch(name);
        let (http, peer, grpc, resp) = (free_ports(3), free_ports(3), free_ports(3), free_ports(3));
        let mut child = Command::new(DRL)
            .args(["cluster", "--nodes", "3", "--dir"])
            .arg(&dir)
            .args(["--base-port", &http.to_string()])
            .args(["--peer-base-port", &peer.to_string()])
            .args(["--grpc-base-port", &grpc.to_string()])
            .args(["--resp-base-port", &resp.to_string()])
            .args(["--admin-token", "tok"])
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut banner = String::new();
        let up = loop {
            match lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    banner.push_str(&line);
                    banner.push('\n');
                    if line.contains("Ctrl-C stops the cluster") {
                        break true;
                    }
                }
                Err(_) => break false,
            }
        };
        let cluster = LocalCluster {
            child,
            http,
            grpc,
            resp,
            dir,
        };
        assert!(up, "the cluster did not come up:\n{banner}");
        cluster
    }

    /// Puts `rules` in force through node 0 and waits until every node
    /// runs them (`marker`, a text only these rules hold, shows it).
    pub fn put_rules(&self, rules: &str, marker: &str) {
        let (code, body) = request(self.http, "PUT", "/v1/rules", rules).unwrap();
        assert_eq!(code, 200, "{body}");
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in self.http..self.http + 3 {
            loop {
                let got = request(port, "GET", "/v1/rules", "").map(|(_, b)| b);
                if got.is_some_and(|b| b.contains(marker)) {
                    break;
                }
                assert!(Instant::now() < deadline, "rules not in force on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl LocalCluster {
    /// The process id of node `slot` (a child of `drl cluster`), found by
    /// its command line.
    pub fn node_pid(&self, slot: usize) -> u32 {
        let dir = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        let config = format!("{dir}/node-{slot}.toml");
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
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
                return pid;
            }
        }
        panic!("no process runs {config}");
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
