//! Every decision path of a node, side by side: in-process nodes over real
//! QUIC serving HTTP, gRPC and RESP, and one way into the counters per
//! protocol (HTTP, native gRPC, Envoy's gRPC, RESP, the axum middleware,
//! the SDK's embedded mode), for `tests/decision_paths.rs` and
//! `examples/protocol_matrix.rs`.
#![allow(dead_code)] // each user takes its own part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;

use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
use drl::grpc::pb::CheckRequest;
use drl::http::client::Connection;
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::NodeFile;
use drl::server::Server;
use drl_core::decide::Decider;

/// One Envoy descriptor.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// Three in-process nodes that know each other, each serving HTTP,
/// gRPC and RESP on ports of their own.
pub struct Nodes {
    pub servers: Vec<Running>,
}

pub struct Running {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub resp: SocketAddr,
    pub decider: Decider,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Nodes {
    pub async fn start(dir: PathBuf, n: u16, rules: &str) -> Nodes {
        std::fs::create_dir_all(&dir).unwrap();
        generate_dev_certs(&dir.join("certs"), &local_cluster_specs(n)).unwrap();
        std::fs::write(dir.join("rules.toml"), rules).unwrap();
        let mut servers: Vec<Running> = Vec::new();
        let mut seed = None;
        for slot in 0..n {
            let mut settings = NodeFile {
                recovery_timeout: "200ms".into(),
                ..NodeFile::local(&dir, slot, seed.iter().cloned().collect())
            }
            .settings(&dir)
            .unwrap();
            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            settings.grpc_listen = Some(any);
            settings.resp_listen = Some(any);
            let server = Server::start(settings).await.unwrap();
            seed.get_or_insert_with(|| server.node().peer_addr().to_string());
            let (stop, mut stopped) = tokio::sync::watch::channel(false);
            let running = Running {
                http: server.http_addr(),
                grpc: server.grpc_addr().unwrap(),
                resp: server.resp_addr().unwrap(),
                decider: server.node().decider(),
                stop,
                task: tokio::spawn(async move {
                    let _ = server
                        .serve(async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        })
                        .await;
                }),
            };
            servers.push(running);
        }
        let nodes = Nodes { servers };
        nodes.wait_connected().await;
        nodes
    }

    /// Every node admits and sees every other node live.
    async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let n = self.servers.len();
        for s in &self.servers {
            loop {
                let mut conn = Connection::open_addr(s.http).await.unwrap();
                let ready = conn.get("/readyz").await.unwrap();
                let live = ready.text().matches("\"live_peers\":").count() > 0
                    && ready.text().contains(&format!("\"live_peers\":{}", n - 1));
                if ready.status == 200 && live {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not connected: {}",
                    ready.text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub async fn stop(self) {
        for s in &self.servers {
            let _ = s.stop.send(true);
        }
        for s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(15), s.task).await;
        }
    }
}

/// A way into the counters, with what it needs open.
pub enum Path {
    Http(Vec<Connection>),
    Native(Vec<RateLimiterClient<Channel>>),
    Envoy(Vec<RateLimitServiceClient<Channel>>),
    Resp(Vec<redis::aio::MultiplexedConnection>),
    Middleware(Vec<axum::Router>),
    Sdk(Vec<drl_client::Client>),
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Http(_) => "http",
            Path::Native(_) => "grpc-native",
            Path::Envoy(_) => "grpc-envoy",
            Path::Resp(_) => "resp",
            Path::Middleware(_) => "middleware",
            Path::Sdk(_) => "sdk-embedded",
        }
    }

    pub async fn open(kind: &str, nodes: &Nodes) -> Path {
        let s = &nodes.servers;
        match kind {
            "http" => {
                let mut conns = Vec::new();
                for r in s {
                    conns.push(Connection::open_addr(r.http).await.unwrap());
                }
                Path::Http(conns)
            }
            "grpc-native" => {
                let mut clients = Vec::new();
                for r in s {
                    clients.push(
                        RateLimiterClient::connect(format!("http://{}", r.grpc))
                            .await
                            .unwrap(),
                    );
                }
                Path::Native(clients)
            }
            "grpc-envoy" => {
                let mut clients = Vec::new();
                for r in s {
                    clients.push(
                        RateLimitServiceClient::connect(format!("http://{}", r.grpc))
                            .await
                            .unwrap(),
                    );
                }
                Path::Envoy(clients)
            }
            "resp" => {
                let mut conns = Vec::new();
                for r in s {
                    let client = redis::Client::open(format!("redis://{}/", r.resp)).unwrap();
                    conns.push(client.get_multiplexed_async_connection().await.unwrap());
                }
                Path::Resp(conns)
            }
            "middleware" => Path::Middleware(
                s.iter()
                    .map(|r| {
                        let state =
                            drl::middleware::RateLimitState::new(r.decider.clone(), |req| {
                                let fields: Vec<(String, String)> = req
                                    .headers()
                                    .iter()
                                    .filter_map(|(n, v)| {
                                        let n = n.as_str().strip_prefix("x-rl-")?;
                                        Some((n.to_owned(), v.to_str().ok()?.to_owned()))
                                    })
                                    .collect();
                                (!fields.is_empty()).then_some(fields)
                            });
                        axum::Router::new()
                            .route("/work", axum::routing::get(|| async { "done" }))
                            .layer(axum::middleware::from_fn_with_state(
                                state,
                                drl::middleware::rate_limit,
                            ))
                    })
                    .collect(),
            ),
            "sdk-embedded" => Path::Sdk(
                s.iter()
                    .map(|r| {
                        drl_client::Client::from_decider(
                            r.decider.clone(),
                            drl_client::ClientConfig::default(),
                        )
                    })
                    .collect(),
            ),
            other => panic!("no path {other}"),
        }
    }

    /// One request of `fields` at cost 1 through node `node`: admitted,
    /// and what the deciding limit has left.
    pub async fn ask(&mut self, node: usize, fields: &[(&str, &str)]) -> (bool, u64) {
        match self {
            Path::Http(conns) => {
                let body =
                    serde_json::to_string(&fields.iter().copied().collect::<HashMap<&str, &str>>())
                        .unwrap();
                let a = conns[node]
                    .request(
                        "POST",
                        "/v1/check",
                        &[("content-type", "application/json")],
                        body.as_bytes(),
                    )
                    .await
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(&a.text()).unwrap();
                (a.status == 200, v["remaining"].as_u64().unwrap())
            }
            Path::Native(clients) => {
                let a = clients[node]
                    .check(CheckRequest {
                        descriptors: fields
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        cost: None,
                        limit: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (a.allowed, a.remaining.unwrap())
            }
            Path::Envoy(clients) => {
                let a = clients[node]
                    .should_rate_limit(RateLimitRequest {
                        domain: "matrix".into(),
                        descriptors: vec![descriptor(fields)],
                        hits_addend: 1,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (
                    a.overall_code == Code::Ok as i32,
                    u64::from(a.statuses[0].limit_remaining),
                )
            }
            Path::Resp(conns) => {
                let mut cmd = redis::cmd("DRL.CHECK");
                for (k, v) in fields {
                    cmd.arg(*k).arg(*v);
                }
                let reply: Vec<i64> = cmd.query_async(&mut conns[node]).await.unwrap();
                (reply[0] == 1, reply[2] as u64)
            }
            Path::Middleware(routers) => {
                use tower::ServiceExt;
                let mut request = axum::http::Request::get("/work");
                for (k, v) in fields {
                    request = request.header(format!("x-rl-{k}"), *v);
                }
                let response = routers[node]
                    .clone()
                    .oneshot(request.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap();
                let ratelimit = response.headers()["ratelimit"].to_str().unwrap().to_owned();
                let remaining = ratelimit
                    .split(";r=")
                    .nth(1)
                    .and_then(|r| r.split(';').next())
                    .and_then(|r| r.parse().ok())
                    .unwrap();
                (response.status() == 200, remaining)
            }
            Path::Sdk(clients) => {
                let d = clients[node].check(fields, 1).await.unwrap();
                (d.is_allowed(), d.quota.map(|q| q.remaining).unwrap())
            }
        }
    }
}

pub const PATHS: [&str; 6] = [
    "http",
    "grpc-native",
    "grpc-envoy",
    "resp",
    "middleware",
    "sdk-embedded",
];

/// A rule of limit L for each small L, told apart by the `tier` field.
pub fn matrix_rules(limits: &[u64]) -> String {
    limits
        .iter()
        .map(|l| {
            format!(
                "[[rules]]\nname = \"l{l}\"\nmatch = {{ tier = \"l{l}\", user = \"*\" }}\n\
                 limits = [ {{ algorithm = \"sliding_window\", limit = {l}, window = \"1h\" }} ]\n"
            )
        })
        .collect()
}
