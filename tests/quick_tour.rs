//! The documentation's examples against the real product: README's quick
//! tour request is run, as written, with curl against a `drl cluster` of
//! three processes, and its answer is compared with the block README shows;
//! the banner that docs/http-api.md shows is compared with the one `drl
//! cluster` prints. What may differ is named: ports, the files folder, the
//! admin token, the date, and the time left until the window resets. A
//! fresh key's first answer says `remaining = limit - cost` on any node of a
//! healthy cluster, so README's `r` is checked exactly.

mod support;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{free_ports, DRL};
const README: &str = include_str!("../README.md");
const HTTP_API: &str = include_str!("../docs/http-api.md");
const TOKEN: &str = "quick-tour-token";

/// The fenced blocks of `lang` in `text` after the heading line `heading`.
fn blocks_after<'a>(text: &'a str, heading: &str, lang: &str) -> Vec<&'a str> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let rest = &text[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    let section = &rest[..end];
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = section[at..].find(&fence) {
        let body_start = at + i + fence.len();
        let body_end = body_start
            + section[body_start..]
                .find("```")
                .expect("an unclosed code block");
        out.push(&section[body_start..body_end]);
        at = body_end + 3;
    }
    out
}

/// A `drl cluster` child, stopped with SIGTERM when dropped.
struct Cluster {
    child: Child,
    dir: PathBuf,
    http_base: u16,
    grpc_base: u16,
    resp_base: Option<u16>,
    banner: String,
}

impl Cluster {
    fn start(name: &str, nodes: u16) -> Cluster {
        Cluster::start_with(name, nodes, false)
    }

    /// With `resp`, every node also serves RESP (`--resp-base-port`).
    fn start_with(name: &str, nodes: u16, resp: bool) -> Cluster {
        let dir = std::env::temp_dir().join(format!("drl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let http_base = free_ports(nodes.into());
        let peer_base = free_ports(nodes.into());
        let grpc_base = free_ports(nodes.into());
        let resp_base = resp.then(|| free_ports(nodes.into()));
        let mut command = Command::new(DRL);
        command
            .args(["cluster", "--nodes", &nodes.to_string(), "--dir"])
            .arg(&dir)
            .args(["--base-port", &http_base.to_string()])
            .args(["--peer-base-port", &peer_base.to_string()])
            .args(["--grpc-base-port", &grpc_base.to_string()]);
        if let Some(p) = resp_base {
            command.args(["--resp-base-port", &p.to_string()]);
        }
        let mut child = command
            .args(["--admin-token", TOKEN])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut cluster = Cluster {
            child,
            dir,
            http_base,
            grpc_base,
            resp_base,
            banner: String::new(),
        };
        // Generous: three nodes start on a loaded two-core machine.
        loop {
            match lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    cluster.banner.push_str(&line);
                    cluster.banner.push('\n');
                    if line.contains("Ctrl-C stops the cluster") {
                        return cluster;
                    }
                }
                Err(_) => panic!("cluster not ready; it printed:\n{}", cluster.banner),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP/1.1 answer as curl -si prints it.
struct Answer {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn parse_answer(text: &str) -> Answer {
    let text = text.replace("\r\n", "\n");
    let (head, body) = text
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("no blank line after the headers in {text:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default().trim().to_owned();
    let headers = lines
        .map(|l| {
            let (name, value) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("header line {l:?}"));
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    Answer {
        status_line,
        headers,
        body: body.trim().to_owned(),
    }
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

/// `"name";r=7;t=2` → ("\"name\"", r, t).
fn ratelimit_fields(value: &str) -> (String, u64, u64) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap_or_default().to_owned();
    let mut r = None;
    let mut t = None;
    for p in parts {
        match p.split_once('=') {
            Some(("r", v)) => r = v.parse().ok(),
            Some(("t", v)) => t = v.parse().ok(),
            _ => panic!("unexpected ratelimit parameter {p:?} in {value:?}"),
        }
    }
    (
        name,
        r.unwrap_or_else(|| panic!("no r in {value:?}")),
        t.unwrap_or_else(|| panic!("no t in {value:?}")),
    )
}

fn curl_present() {
    let found = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "curl is needed to run README's commands as written (apt-get install curl)"
    );
}

fn run_shell(command: &str) -> String {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// README's first tour request, run as written, answers what README shows.
#[test]
fn readme_quick_tour_matches_a_real_cluster() {
    curl_present();
    let sh = blocks_after(README, "### The HTTP API", "sh");
    let http = blocks_after(README, "### The HTTP API", "http");
    let command = sh
        .first()
        .and_then(|b| b.lines().find(|l| l.starts_with("curl ")))
        .expect("README's HTTP API section starts with a curl command");
    let shown = parse_answer(http.first().expect("README shows the answer"));

    let cluster = Cluster::start("tour", 3);
    assert!(
        command.contains("127.0.0.1:8400"),
        "the tour talks to node-0's default port: {command}"
    );
    let command = command.replace(
        "127.0.0.1:8400",
        &format!("127.0.0.1:{}", cluster.http_base),
    );
    let got = parse_answer(&run_shell(&command));

    // Status and the set of headers.
    assert_eq!(got.status_line, shown.status_line);
    let names = |a: &Answer| a.headers.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&got).into_iter().collect::<BTreeSet<_>>(),
        names(&shown).into_iter().collect::<BTreeSet<_>>(),
        "header names"
    );
    // Values that do not depend on timing are equal.
    for name in ["content-type", "ratelimit-policy"] {
        assert_eq!(got.header(name), shown.header(name), "{name}");
    }
    // The policy's quota and window, as README states them.
    let policy = shown.header("ratelimit-policy");
    let q: u64 = policy
        .split(';')
        .find_map(|p| p.strip_prefix("q="))
        .and_then(|v| v.parse().ok())
        .expect("q= in README's policy");
    let (shown_name, shown_r, shown_t) = ratelimit_fields(shown.header("ratelimit"));
    let (got_name, got_r, got_t) = ratelimit_fields(got.header("ratelimit"));
    assert_eq!(got_name, shown_name);
    assert_eq!(shown_r, q - 1, "README shows the documented limit - cost");
    assert_eq!(
        got_r, shown_r,
        "a fresh key's first answer in a healthy cluster is limit - cost"
    );
    let w: u64 = policy
        .split(';')
        .find_map(|p| p.strip_prefix("w="))
        .and_then(|v| v.parse().ok())
        .expect("w= in README's policy");
    assert!(shown_t <= w && got_t <= w, "reset within the window");

    // The body: the same fields in the same order; equal where exact.
    let shown_body: serde_json::Value = serde_json::from_str(&shown.body).unwrap();
    let got_body: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    let keys = |v: &serde_json::Value| {
        v.as_object()
            .expect("a JSON object")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&got_body), keys(&shown_body), "JSON fields");
    for exact in [
        "allowed",
        "outcome",
        "rule",
        "limit",
        "window_ms",
        "retry_after_ms",
    ] {
        assert_eq!(got_body[exact], shown_body[exact], "{exact}");
    }
    assert_eq!(shown_body["remaining"], shown_r);
    assert_eq!(got_body["remaining"], got_r, "body and header agree");
    let reset = got_body["reset_ms"].as_u64().expect("reset_ms");
    assert!(reset <= got_body["window_ms"].as_u64().unwrap_or(0));
    assert_eq!(
        got.header("content-length"),
        got.body.len().to_string(),
        "content-length"
    );
    assert_eq!(shown.header("content-length"), shown.body.len().to_string());
}

/// Replaces what differs between runs with what the docs show.
fn normalise_banner(banner: &str, dir: &Path, http_base: u16, grpc_base: u16) -> String {
    let mut text = banner.replace(&dir.display().to_string(), "/tmp/drl-cluster");
    for i in 0..3 {
        text = text.replace(
            &format!("127.0.0.1:{}", http_base + i),
            &format!("127.0.0.1:{}", 8400 + i),
        );
        text = text.replace(
            &format!("127.0.0.1:{}", grpc_base + i),
            &format!("127.0.0.1:{}", 9400 + i),
        );
    }
    text.replace(TOKEN, "5f0c…")
}

/// docs/http-api.md's quick start shows the banner `drl cluster` prints.
#[test]
fn the_cluster_banner_is_the_one_documented() {
    let shown = blocks_after(HTTP_API, "## Quick start", "text");
    let shown = shown.first().expect("the quick start shows the banner");
    // The docs annotate the token line; the annotation is not printed.
    let shown: Vec<&str> = shown
        .lines()
        .map(|l| l.split("   (").next().unwrap_or(l).trim_end())
        .collect();
    let cluster = Cluster::start("banner", 3);
    let got = normalise_banner(
        &cluster.banner,
        &cluster.dir,
        cluster.http_base,
        cluster.grpc_base,
    );
    let got: Vec<&str> = got.lines().map(str::trim_end).collect();
    // The banner starts with an empty line, which the docs leave out.
    let got: Vec<&str> = got.into_iter().skip_while(|l| l.is_empty()).collect();
    assert_eq!(got, shown);
    // And README's "two commands" promise: files land where it says.
    assert!(README.contains("/tmp/drl-cluster/"));
}

/// Every metric the shipped alerts and dashboard query exists in a real
/// node's `/metrics` (with peers, so the per-peer series are there too).
#[test]
fn alerts_and_dashboard_query_metrics_the_nodes_export() {
    const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");
    const DASHBOARD: &str = include_str!("../deploy/grafana/drl-dashboard.json");
    let referenced: BTreeSet<String> = [ALERTS, DASHBOARD]
        .iter()
        .flat_map(|text| {
            text.match_indices("drl_").map(|(i, _)| {
                text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect::<String>()
            })
        })
        .collect();
    assert!(referenced.contains("drl_minority"), "{referenced:?}");
    let cluster = Cluster::start("metrics", 3);
    let url = format!("http://127.0.0.1:{}/metrics", cluster.http_base);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = run_shell(&format!("curl -s {url}"));
        let exported: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = referenced
            .iter()
            .filter(|name| !exported.contains(name.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queried but not exported: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One RESP command over a raw TCP connection, as `redis-cli` sends it;
/// the reply's text, as far as it has arrived within a second.
fn resp_command(port: u16, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        // A simple reply ends with its line; an array of 5 integers with
        // its sixth.
        let text = String::from_utf8_lossy(&got);
        if (text.starts_with('-') || text.starts_with('+')) && text.ends_with("\r\n")
            || text.matches("\r\n").count() >= 6
        {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A first contact on every protocol of a `drl cluster` with the sample
/// rules: README's curl, an Envoy RLS call with a real gRPC client, a RESP
/// call as `redis-cli` makes it; and a request the sample's `endpoints`
/// allow-list does not cover is refused on each of them, and by `drl load`,
/// with words that name the list's line and what to change.
#[test]
fn first_contact_works_on_every_protocol_and_refusals_say_what_to_change() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

    curl_present();
    let cluster = Cluster::start_with("first-contact", 1, true);
    let line = include_str!("../deploy/rules.example.toml")
        .lines()
        .position(|l| l.starts_with("endpoints = "))
        .expect("the sample rules have an allow-list")
        + 1;
    let says_what_to_change = |text: &str| {
        text.contains(&format!("`endpoints` allow-list (line {line})"))
            && text.contains("remove the list")
            && text.contains("rules file: ")
            && text.contains("rules.toml")
    };
    let http = cluster.http_base;

    // HTTP: README's request, then one outside the allow-list.
    let tour = run_shell(&format!(
        "curl -s -X POST http://127.0.0.1:{http}/v1/check -d '{{\"user\":\"bob\",\"endpoint\":\"/v1/search\"}}'"
    ));
    assert!(tour.contains("\"allowed\":true"), "{tour}");
    let refused = run_shell(&format!(
        "curl -s -w ' %{{http_code}}' -X POST http://127.0.0.1:{http}/v1/check -d '{{\"user\":\"bob\",\"endpoint\":\"/v2/other\"}}'"
    ));
    assert!(refused.ends_with(" 400"), "{refused}");
    assert!(says_what_to_change(&refused), "{refused}");

    // gRPC: Envoy's rate limit service with a tonic client.
    let grpc = format!("http://127.0.0.1:{}", cluster.grpc_base);
    let descriptor = |entries: &[(&str, &str)]| RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ok, refused) = rt.block_on(async {
        let mut client = RateLimitServiceClient::connect(grpc).await.unwrap();
        let ok = client
            .should_rate_limit(RateLimitRequest {
                domain: "edge".into(),
                descriptors: vec![descriptor(&[("endpoint", "/v1/search"), ("user", "carol")])],
                hits_addend: 1,
            })
            .await
            .unwrap()
            .into_inner();
        // Envoy's generic descriptors carry no `endpoint`.
        let refused = client
            .should_rate_limit(RateLimitRequest {
                domain: "edge".into(),
                descriptors: vec![descriptor(&[("remote_address", "10.0.0.1")])],
                hits_addend: 1,
            })
            .await
            .unwrap_err();
        (ok, refused)
    });
    assert_eq!(ok.overall_code, Code::Ok as i32, "{ok:?}");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(says_what_to_change(refused.message()), "{refused:?}");

    // RESP, as redis-cli sends it.
    let resp = cluster.resp_base.unwrap();
    let allowed = resp_command(
        resp,
        &["DRL.CHECK", "endpoint", "/v1/search", "user", "dave"],
    );
    assert!(
        allowed.starts_with("*5\r\n:1\r\n"),
        "1: allowed: {allowed:?}"
    );
    // README's redis-cell line: its own limit, not the rules' allow-list.
    let cell = resp_command(resp, &["CL.THROTTLE", "user123", "15", "30", "60"]);
    assert!(cell.starts_with("*5\r\n:0\r\n:16\r\n:15\r\n"), "{cell:?}");
    let refused = resp_command(resp, &["DRL.CHECK", "user", "dave"]);
    assert!(refused.starts_with("-ERR "), "{refused:?}");
    assert!(says_what_to_change(&refused), "{refused:?}");

    // drl load with its defaults sends no endpoint: every request is an
    // error, and the summary says why.
    let out = Command::new(DRL)
        .args(["load", "--node", &format!("http://127.0.0.1:{http}")])
        .args([
            "--connections",
            "2",
            "--duration",
            "500ms",
            "--progress",
            "0s",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let reason = text
        .lines()
        .find(|l| l.trim_start().starts_with("error ("))
        .unwrap_or_else(|| panic!("no error reason in:\n{text}"));
    assert!(
        reason.contains("400: the request has no `endpoint`"),
        "{reason}"
    );
    assert!(says_what_to_change(reason), "{reason}");
}
