//! What a newcomer meets on real processes: a lone node that says why it is
//! not ready and what to change, `drl doctor` reading it, the development
//! key seed flagged, `drl cluster` refusing ports another cluster holds and
//! naming each child's log lines, `drl load` giving up on a stalled node
//! after its timeout while it prints progress, and output piped to `head`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, free_ports, log_file, log_tail, request, scratch, status, DRL};

const EXAMPLE_RULES: &str = include_str!("../deploy/rules.example.toml");

fn drl(args: &[&str]) -> Output {
    Command::new(DRL)
        .args(args)
        .env_remove("DRL_ADMIN_TOKEN")
        .env_remove("DRL_NODE")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A node on `http` whose log goes to `dir/node.log`: with `joining`, node
/// 1 seeded with an address nobody answers on (it waits to hear from a
/// member); without, node 0 with no seeds (a cluster of its own).
fn lone_node(dir: &Path, http: u16, joining: bool, key_seed: Option<&str>) -> Child {
    let o = drl(&[
        "certs",
        "--dir",
        dir.join("certs").to_str().unwrap(),
        "--nodes",
        "2",
    ]);
    assert!(o.status.success(), "{o:?}");
    std::fs::write(dir.join("rules.toml"), EXAMPLE_RULES).unwrap();
    let mut cmd = Command::new(DRL);
    cmd.current_dir(dir)
        .args(["node", "--listen-http", &format!("127.0.0.1:{http}")])
        .args(["--listen-peer", &format!("127.0.0.1:{}", free_port())])
        .env("DRL_RECOVERY_TIMEOUT", "100ms")
        .env("RUST_LOG", "info")
        .env_remove("DRL_KEY_SEED")
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("node.log")));
    if let Some(seed) = key_seed {
        cmd.env("DRL_KEY_SEED", seed);
    }
    if joining {
        cmd.args(["--name", "node-1", "--slot", "1"])
            .args([
                "--tls-cert",
                "certs/node-1.pem",
                "--tls-key",
                "certs/node-1-key.pem",
            ])
            .args(["--seeds", &format!("127.0.0.1:{}", free_port())]);
    }
    cmd.spawn().unwrap()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `f` holds, or panics after `secs` with `what`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lone_node_says_why_it_waits_and_doctor_reads_it() {
    let dir = scratch("first-lone");
    let http = free_port();
    let node = lone_node(&dir, http, true, None);
    let log = dir.join("node.log");
    wait_for(30, "no HTTP", || {
        status(http, "GET", "/healthz", "").is_some()
    });
    // /readyz answers 503 with the reason and what to change.
    let (code, answer) = request(http, "GET", "/readyz", "").unwrap();
    assert_eq!(code, 503, "{answer}");
    for words in [
        "waiting to hear from a member of the cluster",
        "seeds: 127.0.0.1:",
        "Start the other nodes",
    ] {
        assert!(answer.contains(words), "{words:?} not in {answer}");
    }
    // The log says it too, once the recovery timeout has passed, and warns
    // about the development key seed at start.
    wait_for(20, "no `not ready` log line", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("not ready: waiting to hear"))
    });
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("key_seed is a development default"), "{said}");
    let (_, metrics) = request(http, "GET", "/metrics", "").unwrap();
    assert!(metrics.contains("\ndrl_insecure_defaults 1"), "{metrics}");

    // drl doctor: the reason, the seed, exit status 1.
    let url = format!("http://127.0.0.1:{http}");
    let o = drl(&["doctor", "--node", &url]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = text(&o.stdout);
    assert!(out.contains("problem: not ready: waiting to hear"), "{out}");
    assert!(out.contains("development default"), "{out}");
    // An address nothing answers on is a problem too, said in words.
    let o = drl(&[
        "doctor",
        "--node",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(text(&o.stdout).contains("problem: unreachable"), "{o:?}");
    stop(node);

    // A lone node without seeds, with its own key seed: ready (a cluster of
    // its own), and doctor says ok.
    let dir = scratch("first-ready");
    let http = free_port();
    let node = lone_node(&dir, http, false, Some("8f14e45fceea167a5a36dedd4bea2543"));
    wait_for(30, "a node without seeds not ready", || {
        support::ready(http)
    });
    let o = drl(&["doctor", "--node", &format!("http://127.0.0.1:{http}")]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.contains("ok: ready") && out.contains("ok: no development defaults"),
        "{out}"
    );
    assert!(
        !std::fs::read_to_string(dir.join("node.log"))
            .unwrap()
            .contains("key_seed is a development default"),
        "{}",
        log_tail(&dir.join("node.log"), 20)
    );
    stop(node);
}

/// `drl cluster --nodes 1` on its own ports (HTTP `base`), stderr piped.
fn cluster(dir: &Path, base: u16, peer: u16, grpc: u16) -> Child {
    Command::new(DRL)
        .args(["cluster", "--nodes", "1", "--dir"])
        .arg(dir)
        .args(["--base-port", &base.to_string()])
        .args(["--peer-base-port", &peer.to_string()])
        .args(["--grpc-base-port", &grpc.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn cluster_refuses_ports_another_cluster_holds_and_names_its_children_logs() {
    let (base, peer, grpc) = (free_ports(1), free_ports(1), free_ports(1));
    let mut first = cluster(&scratch("first-cluster-a"), base, peer, grpc);
    // The children's log lines come prefixed with their node's name.
    let mut err = BufReader::new(first.stderr.take().unwrap());
    let start = Instant::now();
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "stderr closed:\n{seen}"
        );
        seen.push_str(&line);
        if line.starts_with("node-0 | ") && line.contains("node started") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{seen}");
    }
    std::thread::spawn(move || for _ in err.lines() {});
    wait_for(60, "the first cluster is not ready", || {
        support::ready(base)
    });

    // A second cluster on the same HTTP port: the first one would answer
    // its readiness probe; it must fail at once, naming the port.
    let started = Instant::now();
    let o = Command::new(DRL)
        .args(["cluster", "--nodes", "1", "--dir"])
        .arg(scratch("first-cluster-b"))
        .args(["--base-port", &base.to_string()])
        .args(["--peer-base-port", &free_ports(1).to_string()])
        .args(["--grpc-base-port", &free_ports(1).to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let said = text(&o.stderr);
    assert!(
        said.contains("ports already in use") && said.contains(&format!("{base}/tcp")),
        "{said}"
    );
    assert!(!text(&o.stdout).contains("ready"), "{o:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Peer ports are UDP: the same check.
    let o = Command::new(DRL)
        .args(["cluster", "--nodes", "1", "--dir"])
        .arg(scratch("first-cluster-c"))
        .args(["--base-port", &free_ports(1).to_string()])
        .args(["--peer-base-port", &peer.to_string()])
        .args(["--grpc-base-port", &free_ports(1).to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(text(&o.stderr).contains(&format!("{peer}/udp")), "{o:?}");
    assert!(support::ready(base), "the first cluster still serves");
    let _ = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    let _ = first.wait();
}

#[test]
fn load_gives_up_on_a_stalled_node_after_its_timeout_and_shows_progress() {
    let dir = scratch("first-load");
    let http = free_port();
    let node = lone_node(&dir, http, false, Some("8f14e45fceea167a5a36dedd4bea2543"));
    wait_for(30, "node not ready", || support::ready(http));
    let pid = node.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let mut load = Command::new(DRL)
        .args(["load", "--node", &format!("http://127.0.0.1:{http}")])
        .args([
            "--connections",
            "2",
            "--duration",
            "2s",
            "--timeout",
            "300ms",
        ])
        .args(["--progress", "500ms", "-f", "endpoint=/v1/search"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Without a timeout it waits for the stalled node for ever.
    while load.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let finished = load.try_wait().unwrap().is_some();
    if !finished {
        let _ = load.kill();
    }
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let o = load.wait_with_output().unwrap();
    stop(node);
    assert!(finished, "drl load still waiting after 20 s: {o:?}");
    assert!(o.status.success(), "{o:?}");
    let out = text(&o.stdout);
    assert!(out.contains("timeout: no answer within 300ms"), "{out}");
    assert!(out.contains("decisions: 0 "), "{out}");
    let progress = text(&o.stderr);
    assert!(
        progress
            .lines()
            .filter(|l| l.contains("s] decisions:"))
            .count()
            >= 2,
        "{progress}"
    );
}

#[test]
fn output_piped_to_head_ends_quietly() {
    let dir = scratch("first-pipe");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, EXAMPLE_RULES).unwrap();
    // Far more output than a pipe holds, so the write after head exits fails.
    let script = format!(
        "'{DRL}' check --rules '{}' -f user=bob -f endpoint=/v1/search --repeat 200000 2>'{}' | head -n 1",
        rules.display(),
        dir.join("err").display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(text(&o.stdout).starts_with("1: allowed"), "{o:?}");
    let err = std::fs::read_to_string(dir.join("err")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}
