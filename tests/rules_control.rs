//! The rules control plane on real processes (a `drl cluster` of three):
//! concurrent admin changes through two nodes are ordered and never lost
//! silently; `If-Match` refuses a stale change; rules that deny nothing
//! need `allow_empty`; every accepted change is in the audit log; `drl
//! rules put` reads the version first and says what happened.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::cluster::LocalCluster;
use support::{request, scratch, DRL};

/// A rule set that denies something, told apart by `tag`.
fn rules(tag: &str, limit: u32) -> String {
    format!(
        "[[rules]]\nname = \"{tag}\"\nmatch = {{ user = \"*\" }}\n\
         limits = [ {{ algorithm = \"fixed_window\", limit = {limit}, window = \"1m\" }} ]\n"
    )
}

/// A version as `(counter, origin, digest)`, from an entity tag.
type Version = (u64, u16, u64);

fn parse_etag(tag: &str) -> Version {
    let inner = tag.trim().trim_matches('"');
    let mut parts = inner.split('.');
    let mut next = || parts.next().unwrap_or_else(|| panic!("etag {tag}"));
    let counter = next().parse().unwrap();
    let origin = next().parse().unwrap();
    let digest = u64::from_str_radix(next(), 16).unwrap();
    (counter, origin, digest)
}

/// One request with extra headers; `Bearer tok`; status, headers and body.
fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer tok\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, head.to_owned(), json)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The version and text a node runs.
fn rules_on(port: u16) -> (Version, String) {
    let (code, head, json) = call(port, "GET", "/v1/rules", &[], "");
    assert_eq!(code, 200, "{head}");
    let etag = parse_etag(header(&head, "etag").expect("GET /v1/rules has an ETag"));
    assert_eq!(json["version"]["etag"].as_str().map(parse_etag), Some(etag));
    (etag, json["text"].as_str().unwrap().to_owned())
}

/// Waits until every node runs the same version, and returns it.
fn converged(cluster: &LocalCluster) -> (Version, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all: Vec<_> = (0..3).map(|i| rules_on(cluster.http + i)).collect();
        if all.iter().all(|r| r == &all[0]) {
            return all[0].clone();
        }
        assert!(Instant::now() < deadline, "no agreement: {all:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one admin change got.
#[derive(Debug)]
struct Put {
    text: String,
    code: u16,
    /// 200: the version put in force; 409/412: the version that won.
    version: Version,
}

/// 100 rounds of two admin changes at once through nodes 0 and 1 (half
/// of them both made against the version just read, with If-Match): every
/// change answered 200 runs on every node when answered, and until a
/// later version replaces it; every other change was told so (409 or
/// 412), and none is lost silently: the version every node ends on is one
/// that was answered 200.
#[test]
fn concurrent_admin_changes_are_ordered_and_never_silently_lost() {
    let cluster = LocalCluster::start("rules-race");
    let mut tally = std::collections::BTreeMap::new();
    for round in 0..100 {
        let (before, _) = converged(&cluster);
        let etag = format!("\"{}.{}.{:016x}\"", before.0, before.1, before.2);
        let with_if_match = round % 2 == 1;
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2u16)
            .map(|node| {
                let barrier = barrier.clone();
                let text = rules(&format!("r{round}-n{node}"), 10 + u32::from(node));
                let (port, etag) = (cluster.http + node, etag.clone());
                std::thread::spawn(move || {
                    let headers: Vec<(&str, &str)> = if with_if_match {
                        vec![("if-match", etag.as_str())]
                    } else {
                        vec![]
                    };
                    barrier.wait();
                    let (code, head, json) = call(port, "PUT", "/v1/rules", &headers, &text);
                    let version = match code {
                        200 => parse_etag(json["version"]["etag"].as_str().unwrap()),
                        409 | 412 => parse_etag(header(&head, "etag").unwrap()),
                        _ => panic!("round {round}: {code} {head} {json}"),
                    };
                    assert_eq!(
                        header(&head, "etag").map(parse_etag),
                        Some(version),
                        "round {round}: {code} carries the version in its ETag"
                    );
                    if code == 200 {
                        // In force on every node the moment it is answered.
                        for i in 0..3 {
                            let (v, _) = rules_on(port - node + i);
                            assert!(
                                v >= version,
                                "round {round}: node {i} runs {v:?} < {version:?}"
                            );
                        }
                    } else {
                        assert!(version > before, "round {round}: the winner is new");
                        let msg = json["error"].as_str().unwrap_or_default();
                        assert!(!msg.is_empty(), "round {round}: {code} says why");
                    }
                    Put {
                        text,
                        code,
                        version,
                    }
                })
            })
            .collect();
        let puts: Vec<Put> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let (last, text) = converged(&cluster);
        let accepted: Vec<&Put> = puts.iter().filter(|p| p.code == 200).collect();
        assert!(
            !accepted.is_empty(),
            "round {round}: neither change stood: {puts:?}"
        );
        for p in &puts {
            *tally.entry(p.code).or_insert(0) += 1;
            match p.code {
                // A 200 stays until a later version replaces it.
                200 => assert!(p.version <= last, "round {round}: {p:?} above {last:?}"),
                // A loser names a winner that is in force, or was replaced.
                _ => assert!(p.version <= last, "round {round}: {p:?}"),
            }
        }
        let winner = accepted.iter().max_by_key(|p| p.version).unwrap();
        assert_eq!(
            (winner.version, winner.text.as_str()),
            (last, text.as_str()),
            "round {round}: every node runs the greatest change answered 200"
        );
    }
    eprintln!("answers over 100 rounds of two changes: {tally:?}");
}

fn drl(args: &[&str]) -> std::process::Output {
    Command::new(DRL)
        .args(args)
        .env_remove("DRL_NODE")
        .env_remove("DRL_ADMIN_TOKEN")
        .output()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `If-Match` with a stale version: 412 naming the version in force, and
/// nothing changes; rules that deny nothing: 400 unless `allow_empty`;
/// every accepted change logged once under `drl::audit` with who, version
/// and what changed; `drl rules put` uses If-Match and says what happened.
#[test]
fn stale_changes_empty_rules_audit_lines_and_the_cli() {
    let dir = scratch("rules-admin");
    let log = dir.join("nodes.log");
    let cluster = LocalCluster::start_logged("rules-admin", &log, "warn,drl::audit=info");
    let node = cluster.http;
    let (v0, _) = converged(&cluster);
    let (code, head, _) = call(node, "GET", "/v1/rules", &[], "");
    assert_eq!(code, 200);
    let e0 = header(&head, "etag").unwrap().to_owned();

    // A change against the version read goes in.
    let one = rules("audit-one", 5);
    let (code, head, json) = call(node, "PUT", "/v1/rules", &[("if-match", &e0)], &one);
    assert_eq!(code, 200, "{json}");
    let e1 = header(&head, "etag").unwrap().to_owned();
    assert!(parse_etag(&e1) > v0);
    assert_eq!(json["confirmed_by"].as_array().map(Vec::len), Some(2));

    // Again against the old version, through another node: 412, unchanged.
    for stale in [
        e0.as_str(),
        "\"not-a-version\"",
        "W/\"1.0.0000000000000000\"",
    ] {
        let other = rules("audit-two", 6);
        let (code, head, json) = call(node + 1, "PUT", "/v1/rules", &[("if-match", stale)], &other);
        assert_eq!(code, 412, "{stale}: {json}");
        assert_eq!(header(&head, "etag"), Some(e1.as_str()));
        assert_eq!(json["etag"].as_str(), Some(e1.as_str()));
    }
    assert_eq!(converged(&cluster), (parse_etag(&e1), one.clone()));

    // Rules that deny nothing are refused unless asked for explicitly.
    let free = "[[rules]]\nname = \"free\"\nmatch = { user = \"*\" }\nunlimited = true\n";
    for body in ["", "# nothing\n", free] {
        let (code, _, json) = call(node, "PUT", "/v1/rules", &[], body);
        assert_eq!(code, 400, "{body:?}: {json}");
        assert!(
            json["error"].as_str().unwrap().contains("allow_empty"),
            "{json}"
        );
    }
    let (code, _, json) = call(node, "PUT", "/v1/rules?allow_emptyy=true", &[], "");
    assert_eq!(code, 400, "{json}");
    assert_eq!(converged(&cluster), (parse_etag(&e1), one.clone()));
    let (code, _, json) = call(node + 2, "PUT", "/v1/rules?allow_empty=true", &[], "");
    assert_eq!(code, 200, "{json}");
    assert_eq!(converged(&cluster).1, "");

    // The CLI: refuses empty rules without --allow-empty, reads the ETag
    // first and reports the version it put in force.
    let url = format!("http://127.0.0.1:{node}");
    let empty = write(&dir, "empty.toml", "");
    let out = drl(&["rules", "put", &empty, "--node", &url, "--token", "tok"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allow_empty"),
        "{err}"
    );
    let cli_rules = rules("cli-change", 7);
    let file = write(&dir, "rules.toml", &cli_rules);
    let out = drl(&["rules", "put", &file, "--node", &url, "--token", "tok"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (now, text) = converged(&cluster);
    assert_eq!(text, cli_rules);
    assert!(
        said.contains(&format!("version {}.{}.{:016x}", now.0, now.1, now.2)),
        "{said}"
    );
    let out = drl(&[
        "rules", "put", &file, "--node", &url, "--token", "tok", "--force",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One audit line per accepted change, naming who, the version and the
    // rules added, removed and changed; none for the refused ones.
    let deadline = Instant::now() + Duration::from_secs(5);
    let audit = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("drl::audit") && l.contains("rules change accepted"))
            .map(str::to_owned)
            .collect();
        if lines.len() >= 4 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(audit.len(), 4, "{audit:#?}");
    let first = &audit[0];
    assert!(first.contains("by=admin"), "{first}");
    assert!(first.contains(&e1.replace('"', "")), "{first}");
    assert!(first.contains("added=[\"audit-one\"]"), "{first}");
    assert!(audit[1].contains("removed=[\"audit-one\"]"), "{}", audit[1]);
    assert!(audit[2].contains("added=[\"cli-change\"]"), "{}", audit[2]);
    assert!(
        audit[3].contains("added=[]") && audit[3].contains("changed=[]"),
        "{}",
        audit[3]
    );
    let _ = request(node, "GET", "/healthz", "");
}
