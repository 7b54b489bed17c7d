//! Real nodes with their HTTP and gRPC APIs on 127.0.0.1:0, for the gRPC
//! tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drl::http::client::Connection;
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{GrpcTls, NodeApi, NodeFile};
use drl::server::Server;

pub fn cluster_dir(name: &str, nodes: u16, rules: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-grpc-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    generate_dev_certs(&dir.join("certs"), &local_cluster_specs(nodes)).unwrap();
    std::fs::write(dir.join("rules.toml"), rules).unwrap();
    dir
}

/// A node serving HTTP and gRPC.
pub struct GrpcNode {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub peer: SocketAddr,
    pub api: NodeApi,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GrpcNode {
    pub async fn start(dir: &Path, slot: u16, seeds: Vec<String>) -> GrpcNode {
        GrpcNode::start_with(dir, slot, seeds, None).await
    }

    /// [`GrpcNode::start`] with the gRPC API over TLS.
    pub async fn start_with(
        dir: &Path,
        slot: u16,
        seeds: Vec<String>,
        tls: Option<GrpcTls>,
    ) -> GrpcNode {
        let mut settings = NodeFile {
            recovery_timeout: "100ms".into(),
            ..NodeFile::local(dir, slot, seeds)
        }
        .settings(dir)
        .unwrap();
        settings.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
        settings.grpc_tls = tls;
        let server = Server::start(settings).await.unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let http = server.http_addr();
        let grpc = server.grpc_addr().unwrap();
        let peer = server.node().peer_addr();
        let api = server.node().api();
        let tasks = vec![tokio::spawn(async move {
            server
                .serve(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .unwrap();
        })];
        GrpcNode {
            http,
            grpc,
            peer,
            api,
            stop: Some(stop),
            tasks,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn wait_ready(&self) {
        let start = Instant::now();
        while !self.api.is_ready() {
            assert!(start.elapsed() < Duration::from_secs(15), "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until this node sees `peers` live peers.
    pub async fn wait_peers(&self, peers: usize) {
        let start = Instant::now();
        while self.api.status().live.len() < peers {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "peers not live: {:?}",
                self.api.status().live
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let mut conn = Connection::open_addr(self.http).await.unwrap();
        let answer = conn.get("/metrics").await.unwrap();
        assert_eq!(answer.status, 200);
        answer.text()
    }

    /// Graceful shutdown of the front-ends and the node.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(true);
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("shutdown within 15 s")
                .unwrap();
        }
    }
}

/// `n` nodes that know each other, ready and connected.
pub async fn cluster(name: &str, n: u16, rules: &str) -> Vec<GrpcNode> {
    let dir = cluster_dir(name, n, rules);
    let first = GrpcNode::start(&dir, 0, vec![]).await;
    let seed = first.peer.to_string();
    let mut nodes = vec![first];
    for slot in 1..n {
        nodes.push(GrpcNode::start(&dir, slot, vec![seed.clone()]).await);
    }
    for node in &nodes {
        node.wait_ready().await;
        node.wait_peers(usize::from(n) - 1).await;
    }
    nodes
}
