//! A cluster of real `drl node` processes, each started, stopped, killed
//! or paused on its own: the restart and membership tests' fixture.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{exit_state, free_port, log_file, log_tail, status as http, DRL};

/// The hourly limit the process tests spend: 300 per user.
pub const LIMIT: u64 = 300;
/// Rules with [`LIMIT`] per user per hour (a sliding window).
pub const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 300, window = "1h" } ]
"#;

/// The in-flight bound on what a crash or a membership change can add
/// beyond [`LIMIT`] on `nodes` nodes: `Q = max(n, ⌈0.02·L⌉)`.
pub fn inflight_bound(nodes: u64) -> u64 {
    nodes.max((LIMIT * 2).div_ceil(100))
}

/// `POST /v1/check` for `user` through `port`: the status code.
pub fn check(port: u16, user: &str) -> Option<u16> {
    http(
        port,
        "POST",
        "/v1/check",
        &format!("{{\"user\":\"{user}\"}}"),
    )
}

/// A cluster of `drl node` processes laid out as `drl cluster` writes it:
/// every node seeded with every other.
pub struct ProcCluster {
    pub dir: PathBuf,
    pub size: usize,
    pub peer: Vec<u16>,
    pub http: Vec<u16>,
    children: Vec<Option<Child>>,
    snapshot_interval: Option<&'static str>,
    /// More lines for every node's configuration file.
    pub extra_config: String,
}

impl ProcCluster {
    pub fn new(
        name: &str,
        size: usize,
        snapshot_interval: Option<&'static str>,
        rules: &str,
    ) -> Self {
        let dir = super::scratch(&format!("procs-{name}"));
        drl::net::generate_dev_certs(
            &dir.join("certs"),
            &drl::net::local_cluster_specs(size as u16),
        )
        .unwrap();
        std::fs::write(dir.join("rules.toml"), rules).unwrap();
        ProcCluster {
            dir,
            size,
            peer: (0..size).map(|_| free_port()).collect(),
            http: (0..size).map(|_| free_port()).collect(),
            children: (0..size).map(|_| None).collect(),
            snapshot_interval,
            extra_config: String::new(),
        }
    }

    pub fn config(&self, slot: usize, seeds: &[u16]) -> PathBuf {
        let seeds = seeds
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let snapshot = match self.snapshot_interval {
            Some(every) => {
                format!("snapshot_path = \"data/node-{slot}.snapshot\"\nsnapshot_interval = \"{every}\"\n")
            }
            None => String::new(),
        };
        let text = format!(
            "name = \"node-{slot}\"\nslot = {slot}\n\
             listen_peer = \"127.0.0.1:{peer}\"\nlisten_http = \"127.0.0.1:{http}\"\n\
             seeds = [{seeds}]\ndiscovery_interval = \"200ms\"\nrecovery_timeout = \"1s\"\n\
             rules = \"rules.toml\"\ndata_dir = \"data\"\n{snapshot}\
             tls_ca = \"certs/ca.pem\"\ntls_cert = \"certs/node-{slot}.pem\"\n\
             tls_key = \"certs/node-{slot}-key.pem\"\n\
             key_seed = \"000102030405060708090a0b0c0d0e0f\"\nadmin_token = \"tok\"\n{extra}",
            extra = self.extra_config,
            peer = self.peer[slot],
            http = self.http[slot],
        );
        let path = self.dir.join(format!("node-{slot}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn start(&mut self, slot: usize) {
        let seeds: Vec<u16> = (0..self.size)
            .filter(|&s| s != slot)
            .map(|s| self.peer[s])
            .collect();
        self.start_with_seeds(slot, &seeds);
    }

    pub fn start_with_seeds(&mut self, slot: usize, seeds: &[u16]) {
        let config = self.config(slot, seeds);
        let child = Command::new(DRL)
            .args(["node", "--config"])
            .arg(&config)
            .current_dir(&self.dir)
            .env_remove("DRL_ADMIN_TOKEN")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log_file(&self.log(slot)))
            .spawn()
            .unwrap();
        self.children[slot] = Some(child);
    }

    /// Node `slot`'s stderr, kept across its restarts.
    pub fn log(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("node-{slot}.log"))
    }

    /// What each node of `slots` said last, and whether it still runs.
    pub fn report(&mut self, slots: &[usize]) -> String {
        let mut out = String::new();
        for &slot in slots {
            let state = match self.children[slot].as_mut() {
                Some(c) => exit_state(c),
                None => "not started".into(),
            };
            out.push_str(&format!(
                "\n--- node {slot} ({state}), last lines of its log:\n{}\n",
                log_tail(&self.log(slot), 30)
            ));
        }
        out
    }

    pub fn child(&self, slot: usize) -> &Child {
        self.children[slot].as_ref().unwrap()
    }

    /// Stops node `slot` cleanly (SIGTERM: it ships its last deltas and
    /// tells its peers it leaves) and waits for it to exit.
    pub fn stop(&mut self, slot: usize) {
        if let Some(mut c) = self.children[slot].take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn kill9(&mut self, slot: usize) {
        if let Some(mut c) = self.children[slot].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn ready(&self, slot: usize) -> bool {
        http(self.http[slot], "GET", "/readyz", "") == Some(200)
    }

    pub fn wait_ready(&mut self, slots: &[usize], timeout: Duration) -> Duration {
        let start = Instant::now();
        while !slots.iter().all(|&s| self.ready(s)) {
            if start.elapsed() >= timeout {
                let report = self.report(slots);
                panic!("nodes {slots:?} not ready after {timeout:?}{report}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    /// Requests for `user` through node `slot` until `want` are admitted
    /// or `span` passed (refusals while the node's in-flight share waits for
    /// acknowledgements are retried); returns the admitted count.
    /// A run of 100 refusals in a row (at least 200 ms of them: longer than
    /// any acknowledgement wait) means the limit is spent.
    pub fn spend(&self, slot: usize, user: &str, want: u64, span: Duration) -> u64 {
        let mut admitted = 0;
        let mut refused_in_a_row = 0;
        let start = Instant::now();
        while admitted < want && refused_in_a_row < 100 && start.elapsed() < span {
            match check(self.http[slot], user) {
                Some(200) => {
                    admitted += 1;
                    refused_in_a_row = 0;
                }
                _ => {
                    refused_in_a_row += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        admitted
    }

    /// Requests for `user` round-robin over `slots` for `span`; the admitted
    /// count.
    pub fn hammer(&self, slots: &[usize], user: &str, span: Duration) -> u64 {
        let start = Instant::now();
        let mut admitted = 0;
        let mut i = 0;
        while start.elapsed() < span {
            if check(self.http[slots[i % slots.len()]], user) == Some(200) {
                admitted += 1;
            }
            i += 1;
        }
        admitted
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for slot in 0..self.size {
            if let Some(c) = &self.children[slot] {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            self.kill9(slot);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
