//! The shipped deploy files agree with themselves and with the node: the
//! Kubernetes manifest's replicas with its certificates and disruption
//! budget (and no cluster size anywhere), its probes with
//! the operations port and routes a node serves, and the ports it exposes
//! with the listeners it configures; the same for the Compose file. The
//! schemas are CI's job (kubernetes-validate, `docker compose config`);
//! these are the checks a schema cannot make.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The port of a `host:port` listener address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// The routes of the operations router, read from the source: a probe path
/// that is not among them would be answered 404.
fn operations_routes() -> BTreeSet<String> {
    let src = read("src/http/mod.rs");
    let body = src
        .split("pub fn operations_router")
        .nth(1)
        .expect("operations_router");
    let body = &body[..body.find("\n}\n").unwrap()];
    body.match_indices(".route(\"")
        .map(|(i, m)| {
            let rest = &body[i + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

/// Majority of `n` nodes.
fn majority(n: u64) -> u64 {
    n / 2 + 1
}

#[test]
fn the_kubernetes_manifest_agrees_with_itself_and_the_node() {
    let docs = documents("deploy/kubernetes/drl.yaml");
    let set = kind(&docs, "StatefulSet", "drl");
    let replicas = set["spec"]["replicas"].as_u64().expect("replicas");
    let pod = &set["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let env: BTreeMap<&str, &str> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    // No cluster size anywhere: the cluster is its membership, so
    // `kubectl scale` is the whole of scaling.
    assert!(
        !env.contains_key("DRL_CLUSTER_SIZE"),
        "the manifest sets a cluster size"
    );
    // The disruption budget keeps a majority at every replica count (a
    // percentage of minAvailable rounds up; past 50 pods, one more).
    let pdb = kind(&docs, "PodDisruptionBudget", "drl");
    let percent: u64 = pdb["spec"]["minAvailable"]
        .as_str()
        .and_then(|p| p.strip_suffix('%'))
        .and_then(|p| p.parse().ok())
        .expect("minAvailable as a percentage");
    for n in 1..=100u64 {
        let kept = (n * percent).div_ceil(100);
        assert!(
            kept == majority(n) || (n > 50 && kept == majority(n) + 1),
            "minAvailable {percent}% keeps {kept} of {n} pods, not a majority"
        );
    }
    // The manifest's instructions issue at least one certificate per replica.
    let text = read("deploy/kubernetes/drl.yaml");
    let issued: u64 = text
        .split("drl certs --dir certs --nodes ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the certificate step");
    assert!(
        issued >= replicas,
        "{issued} certificates for {replicas} replicas"
    );

    // Every listener is on, and each has a named container port.
    let ports: BTreeMap<&str, (u64, &str)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                (
                    p["containerPort"].as_u64().unwrap(),
                    p["protocol"].as_str().unwrap_or("TCP"),
                ),
            )
        })
        .collect();
    let listeners = [
        ("DRL_LISTEN_HTTP", "http", "TCP"),
        ("DRL_LISTEN_ADMIN", "admin", "TCP"),
        ("DRL_GRPC_LISTEN", "grpc", "TCP"),
        ("DRL_RESP_LISTEN", "resp", "TCP"),
        ("DRL_LISTEN_PEER", "peer", "UDP"),
    ];
    for (var, name, proto) in listeners {
        let addr = env
            .get(var)
            .unwrap_or_else(|| panic!("{var} is not set: that listener is off"));
        assert_eq!(
            ports.get(name),
            Some(&(u64::from(port_of(addr)), proto)),
            "{var}={addr} has no container port {name}/{proto}"
        );
    }
    assert_eq!(
        ports.len(),
        listeners.len(),
        "a container port with no listener"
    );

    // Probes: on the operations port, at routes it serves.
    let routes = operations_routes();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            get["port"].as_str(),
            Some("admin"),
            "{probe} on the decision port"
        );
        assert!(routes.contains(path), "{path} is not served: {routes:?}");
    }
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some(ports["admin"].0.to_string().as_str()),
        "Prometheus scrapes the operations port"
    );
    assert!(routes.contains("/metrics"));
    let scrape = read("deploy/kubernetes/prometheus-scrape.yaml");
    assert!(
        scrape.contains("regex: admin"),
        "the scrape job keeps the admin port"
    );

    // The client service exposes HTTP, gRPC and RESP; the peers' headless
    // service the peer port.
    let exposed = |service: &str| -> BTreeSet<(String, u64)> {
        kind(&docs, "Service", service)["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| {
                let target = p["targetPort"]
                    .as_str()
                    .or(p["name"].as_str())
                    .unwrap()
                    .to_owned();
                (target, p["port"].as_u64().unwrap())
            })
            .collect()
    };
    let api = exposed("drl");
    for name in ["http", "grpc", "resp"] {
        assert!(
            api.contains(&(name.to_owned(), ports[name].0)),
            "service drl does not expose {name}: {api:?}"
        );
    }
    assert!(exposed("drl-peers").contains(&("peer".to_owned(), ports["peer"].0)));
}

/// `${VAR-default}` and `${VAR:-default}` resolved to their defaults.
fn compose_default(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').unwrap() + i;
        let inner = &rest[i + 2..end];
        let default = inner
            .split_once(":-")
            .or_else(|| inner.split_once('-'))
            .map_or("", |(_, d)| d);
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn the_compose_file_agrees_with_itself_and_the_node() {
    let docs = documents("deploy/docker-compose.yml");
    let services = docs[0]["services"].as_mapping().unwrap();
    let nodes: Vec<(&str, &Value)> = services
        .iter()
        .filter(|(_, s)| !s["environment"]["DRL_SLOT"].is_null())
        .map(|(n, s)| (n.as_str().unwrap(), s))
        .collect();
    let n = nodes.len() as u64;
    assert!(n >= 1);
    let mut slots = BTreeSet::new();
    for (name, node) in &nodes {
        let env = &node["environment"];
        let get = |var: &str| {
            compose_default(
                env[var]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: {var} is not set")),
            )
        };
        assert!(
            env["DRL_CLUSTER_SIZE"].is_null(),
            "{name} sets a cluster size"
        );
        slots.insert(get("DRL_SLOT").parse::<u64>().unwrap());
        let seeds = get("DRL_SEEDS");
        for (other, _) in &nodes {
            assert!(
                seeds.contains(&format!("{other}:{}", port_of(&get("DRL_LISTEN_PEER")))),
                "{name}'s seeds miss {other}: {seeds}"
            );
        }
        // Every client listener is on and published.
        let published: BTreeSet<u16> = node["ports"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} publishes nothing"))
            .iter()
            .map(|p| port_of(&compose_default(p.as_str().unwrap())))
            .collect();
        for var in ["DRL_LISTEN_HTTP", "DRL_GRPC_LISTEN", "DRL_RESP_LISTEN"] {
            let port = port_of(&get(var));
            assert!(
                published.contains(&port),
                "{name}: {var} ({port}) is not published: {published:?}"
            );
        }
    }
    assert_eq!(slots, (0..n).collect(), "slots are 0..{n}, each once");
    let certs = services
        .get("certs")
        .and_then(|c| c["command"].as_sequence())
        .expect("the certs job");
    let at = certs
        .iter()
        .position(|a| a.as_str() == Some("--nodes"))
        .unwrap();
    assert_eq!(certs[at + 1].as_str(), Some(n.to_string().as_str()));
}
