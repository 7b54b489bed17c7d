//! The `drl` binary as a user runs it: a node configured by file, flags and
//! environment; checks, rules admin and load over HTTP; a clean stop on
//! SIGTERM.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXAMPLE_RULES: &str = include_str!("../deploy/rules.example.toml");

use support::{free_port, free_ports, DRL};

fn scratch(name: &str) -> PathBuf {
    support::scratch(&format!("cli-{name}"))
}

fn drl(args: &[&str]) -> Output {
    Command::new(DRL)
        .args(args)
        .env_remove("DRL_ADMIN_TOKEN")
        .env_remove("DRL_NODE")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn http_get(port: u16, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

fn start_node(dir: &Path, http: u16) -> Child {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "name = \"node-0\"\nlisten_http = \"127.0.0.1:1\"\nrules = \"rules.toml\"\n\
         tls_ca = \"certs/ca.pem\"\ntls_cert = \"certs/node-0.pem\"\ntls_key = \"certs/node-0-key.pem\"\n",
    )
    .unwrap();
    // The file says port 1; the flag wins. The peer port comes from the
    // environment, the admin token too.
    Command::new(DRL)
        .args(["node", "--config"])
        .arg(&config)
        .args(["--listen-http", &format!("127.0.0.1:{http}")])
        .env("DRL_LISTEN_PEER", format!("127.0.0.1:{}", free_port()))
        .env("DRL_ADMIN_TOKEN", "tok")
        .env("DRL_RECOVERY_TIMEOUT", "100ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn rules_validate_and_check_work_offline() {
    let dir = scratch("offline");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, EXAMPLE_RULES).unwrap();
    let o = drl(&["rules", "validate", rules.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("search-per-user"));
    let o = drl(&[
        "check",
        "--rules",
        rules.to_str().unwrap(),
        "-f",
        "user=bob",
        "-f",
        "endpoint=/v1/search",
        "--repeat",
        "11",
    ]);
    // A denial is an answer, not an error: exit status 1, not 0 or 2.
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("1 of 11 requests denied"),
        "{o:?}"
    );
    let out = stdout(&o);
    assert!(
        out.contains("10: allowed") && out.contains("11: denied"),
        "{out}"
    );
    std::fs::write(&rules, "[[rules]]\nname = 1\n").unwrap();
    let o = drl(&["rules", "validate", rules.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("line 2"),
        "{o:?}"
    );
}

#[test]
fn a_node_serves_checks_admin_and_load_then_stops_on_sigterm() {
    let dir = scratch("node");
    let o = drl(&[
        "certs",
        "--dir",
        dir.join("certs").to_str().unwrap(),
        "--nodes",
        "1",
    ]);
    assert!(o.status.success(), "{o:?}");
    std::fs::write(dir.join("rules.toml"), EXAMPLE_RULES).unwrap();
    let http = free_port();
    let mut child = start_node(&dir, http);
    let start = Instant::now();
    while http_get(http, "/readyz") != Some(200) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("node exited: {status}: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "node not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{http}");

    let o = drl(&[
        "check",
        "--node",
        &url,
        "-f",
        "user=alice",
        "-f",
        "endpoint=/v1/login",
        "-f",
        "ip=10.0.0.1",
        "--repeat",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(1), "a 429 exits 1: {o:?}");
    let out = stdout(&o);
    assert!(
        out.contains("1: 200 allowed") && out.contains("4: 429 denied"),
        "{out}"
    );
    assert!(out.contains("retry-after:"), "{out}");
    let o = drl(&[
        "check",
        "--node",
        &url,
        "-f",
        "user=alice",
        "-f",
        "endpoint=/v1/login",
        "-f",
        "ip=10.0.0.2",
    ]);
    assert!(o.status.success(), "allowed exits 0: {o:?}");

    let o = drl(&["rules", "get", "--node", &url]);
    assert_eq!(o.status.code(), Some(2), "no token: refused");
    let o = drl(&["rules", "get", "--node", &url, "--token", "tok"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), EXAMPLE_RULES);

    let new_rules = dir.join("new.toml");
    std::fs::write(
        &new_rules,
        "[[rules]]\nname = \"only\"\nmatch = { user = \"*\" }\nlimits = [ { algorithm = \"fixed_window\", limit = 5, window = \"1m\" } ]\n",
    )
    .unwrap();
    let path = new_rules.to_str().unwrap();
    let o = drl(&["rules", "validate", path, "--node", &url, "--token", "tok"]);
    assert!(o.status.success(), "{o:?}");
    let o = drl(&["rules", "put", path, "--node", &url, "--token", "tok"]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("version 1.0"), "{}", stdout(&o));

    let o = drl(&[
        "load",
        "--node",
        &url,
        "--connections",
        "4",
        "--duration",
        "1s",
        "--keys",
        "3",
    ]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let field = |name: &str| load_result(&out, name);
    assert!(field("decisions_per_sec") > 0.0, "{out}");
    assert!(field("allowed") >= 15.0, "3 users × 5 per minute: {out}");
    assert!(field("denied") > 0.0, "{out}");
    // Paced: 200 requests a second for one second, whatever the answers.
    let o = drl(&[
        "load",
        "--node",
        &url,
        "--connections",
        "4",
        "--duration",
        "1s",
        "--rate",
        "200",
    ]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let sent: f64 = ["allowed", "denied", "errors"]
        .iter()
        .map(|name| load_result(&out, name))
        .sum();
    assert!((150.0..=200.0).contains(&sent), "{sent} sent: {out}");
    assert_eq!(field("errors"), 0.0, "{out}");
    assert!(field("p99_us") >= field("p50_us"), "{out}");

    // SIGTERM: drain, final delta, exit 0.
    let stop = Instant::now();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(stop.elapsed() < Duration::from_secs(10), "no clean stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http_get(http, "/healthz"), None, "still listening");
}

#[test]
fn the_example_node_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/node.example.toml");
    let file = drl::node::NodeFile::load(&path).unwrap();
    let settings = file.settings(path.parent().unwrap()).unwrap();
    assert_eq!(settings.listen_http.port(), 8400);
    // The rules file it names exists beside it and is valid.
    let rules = std::fs::read_to_string(&settings.rules).unwrap();
    drl_core::rules::RuleSet::from_toml(&rules).unwrap();
    // The example shows the defaults, but for the rules file's name.
    let shown = drl::node::NodeFile {
        rules: "rules.toml".into(),
        ..file
    };
    assert_eq!(
        format!("{shown:?}"),
        format!("{:?}", drl::node::NodeFile::default())
    );
}

/// Field `name` of the `result:` line `drl load` prints.
fn load_result(out: &str, name: &str) -> f64 {
    let result = out.lines().find(|l| l.starts_with("result:")).unwrap();
    result
        .split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
        .parse()
        .unwrap()
}

/// The processes whose parent is `pid`, oldest first.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found: Vec<(u64, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // After the parenthesised name: state, ppid, ..., starttime (field 22).
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ppid: u32 = rest.get(1)?.parse().ok()?;
            let start: u64 = rest.get(19)?.parse().ok()?;
            (ppid == pid).then_some((start, p))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// `drl cluster --nodes 2`: certificates, configs, children, readiness,
/// a banner, a node killed with -9 started again, and every child stopped
/// on SIGTERM.
#[test]
fn a_local_cluster_starts_serves_and_stops() {
    let dir = scratch("cluster");
    // Three of each: `drl cluster add` takes the next ports.
    let base = free_ports(3);
    let mut cluster = Command::new(DRL)
        .args(["cluster", "--nodes", "2", "--dir"])
        .arg(&dir)
        .args([
            "--base-port",
            &base.to_string(),
            "--peer-base-port",
            &free_ports(3).to_string(),
            "--grpc-base-port",
            &free_ports(3).to_string(),
        ])
        .args(["--admin-token", "tok"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The banner's last line says the cluster is up.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let out = cluster.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut banner = String::new();
    let pid = cluster.id().to_string();
    let ready = loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
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
    if !ready {
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = cluster.wait();
        panic!("cluster not ready: {banner}");
    }
    assert_eq!(http_get(base, "/readyz"), Some(200));
    assert_eq!(http_get(base + 1, "/readyz"), Some(200));
    for file in [
        "certs/ca.pem",
        "certs/node-1-key.pem",
        "node-0.toml",
        "node-1.toml",
        "rules.toml",
    ] {
        assert!(dir.join(file).exists(), "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("rules.toml")).unwrap(),
        EXAMPLE_RULES
    );
    let o = drl(&[
        "check",
        "--node",
        &format!("http://127.0.0.1:{}", base + 1),
        "-f",
        "user=alice",
        "-f",
        "endpoint=/v1/search",
    ]);
    assert!(stdout(&o).contains("1: 200 allowed"), "{o:?}");
    // A node killed with -9 is started again; the cluster keeps running.
    let nodes = children_of(cluster.id());
    assert_eq!(nodes.len(), 2, "children: {nodes:?}");
    assert!(Command::new("kill")
        .args(["-KILL", &nodes[1].to_string()])
        .status()
        .unwrap()
        .success());
    let killed = Instant::now();
    while http_get(base + 1, "/readyz") != Some(200) || killed.elapsed() < Duration::from_secs(1) {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "node-1 not started again"
        );
        assert!(cluster.try_wait().unwrap().is_none(), "the cluster stopped");
        assert_eq!(http_get(base, "/healthz"), Some(200), "node-0 stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = children_of(cluster.id());
    assert!(
        again.len() == 2 && again.contains(&nodes[0]) && !again.contains(&nodes[1]),
        "before {nodes:?}, after {again:?}"
    );
    // `drl cluster add` grows the running cluster by one node, and the
    // cluster shrinks back when that node stops: no other node restarts.
    let members = |port: u16| {
        support::request(port, "GET", "/readyz", "")
            .and_then(|(_, body)| body.split("\"members\":").nth(1).map(str::to_owned))
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
    };
    let mut added = Command::new(DRL)
        .args(["cluster", "add", "--dir"])
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = added.stdout.take().unwrap();
    let joined = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("node-2 joined the cluster"))
    });
    let start = Instant::now();
    while http_get(base + 2, "/readyz") != Some(200)
        || [base, base + 1, base + 2]
            .iter()
            .any(|&p| members(p) != Some(3))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node-2 did not join"
        );
        assert!(
            added.try_wait().unwrap().is_none(),
            "drl cluster add exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        joined.join().unwrap().is_some(),
        "no line says node-2 joined"
    );
    assert!(dir.join("certs/node-2.pem").exists() && dir.join("node-2.toml").exists());
    let o = drl(&[
        "check",
        "--node",
        &format!("http://127.0.0.1:{}", base + 2),
        "-f",
        "user=carol",
        "-f",
        "endpoint=/v1/search",
    ]);
    assert!(stdout(&o).contains("1: 200 allowed"), "{o:?}");
    assert!(Command::new("kill")
        .args(["-TERM", &added.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(added.wait().unwrap().success());
    let left = Instant::now();
    while members(base) != Some(2) || members(base + 1) != Some(2) {
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "node-2 not forgotten"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        children_of(cluster.id()),
        again,
        "a node of the cluster restarted"
    );
    let stop = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The children inherit stdout: it closes when every process has exited.
    reader.join().unwrap();
    let status = cluster.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(stop.elapsed() < Duration::from_secs(20));
    assert!(banner.contains("2 nodes ready"), "{banner}");
    assert!(
        banner.contains(&format!("http://127.0.0.1:{base}")),
        "{banner}"
    );
    assert!(banner.contains("curl"), "{banner}");
    assert_eq!(http_get(base, "/healthz"), None, "node-0 still running");
    assert_eq!(http_get(base + 1, "/healthz"), None, "node-1 still running");
}
