//! Real nodes in process (the node and HTTP server that `drl node` runs, on
//! loopback ports), and a TCP proxy in front of each that can delay, swallow
//! or cut the traffic.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::{NodeApi, NodeFile};
use drl::server::{RunError, Server};
use drl_core::window::Ring;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-client-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running node serving its HTTP API.
pub struct TestNode {
    pub slot: u16,
    pub http: SocketAddr,
    /// The native gRPC API.
    pub grpc: SocketAddr,
    pub peer: SocketAddr,
    pub api: NodeApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl TestNode {
    /// Graceful stop: drain, final delta, leave, snapshot.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("node stops within 20 s")
            .expect("node task")
            .expect("node ran");
    }

    /// Hits counted for every key of the first limit, in this node's merged
    /// view.
    pub fn counted(&self) -> u64 {
        let limiter = &self.api.limiter;
        let now = drl_core::time::Clock::now(limiter.clock());
        let mut total = 0;
        if let Some(table) = limiter.table(0) {
            table.for_each(|e| {
                let mut nets = vec![0u64; e.spec().buckets()];
                Ring::read(e, &e.spec(), now, &mut nets);
                total += nets.iter().sum::<u64>();
            });
        }
        total
    }
}

/// A cluster of `n` nodes sharing one directory (certificates, rules,
/// snapshots).
pub struct Cluster {
    pub dir: PathBuf,
    pub size: usize,
    pub snapshots: bool,
}

impl Cluster {
    pub fn new(name: &str, size: u16, rules: &str, snapshots: bool) -> Cluster {
        let dir = scratch(name);
        generate_dev_certs(&dir.join("certs"), &local_cluster_specs(size)).unwrap();
        std::fs::write(dir.join("rules.toml"), rules).unwrap();
        Cluster {
            dir,
            size: usize::from(size),
            snapshots,
        }
    }

    /// Starts node `slot` on `http` (port 0 for any) with `seeds`.
    pub async fn start_node(&self, slot: u16, http: SocketAddr, seeds: Vec<String>) -> TestNode {
        self.start_node_tls(slot, http, seeds, None).await
    }

    /// [`Cluster::start_node`] with its gRPC API over `tls`.
    pub async fn start_node_tls(
        &self,
        slot: u16,
        http: SocketAddr,
        seeds: Vec<String>,
        tls: Option<drl::node::GrpcTls>,
    ) -> TestNode {
        let file = NodeFile {
            recovery_timeout: "1s".into(),
            listen_http: http,
            snapshot_path: self
                .snapshots
                .then(|| self.dir.join(format!("snapshot-{slot}.bin"))),
            ..NodeFile::local(&self.dir, slot, seeds)
        };
        let mut settings = file.settings(&self.dir).unwrap();
        settings.grpc_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        settings.grpc_tls = tls;
        let node = Server::start(settings).await.unwrap();
        let http = node.http_addr();
        let grpc = node.grpc_addr().unwrap();
        let peer = node.node().peer_addr();
        let api = node.node().api();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        TestNode {
            slot,
            http,
            grpc,
            peer,
            api,
            stop: Some(stop),
            task,
        }
    }

    /// Starts every node (on `https[i]`, or port 0) and waits for a full
    /// mesh of ready nodes.
    pub async fn start(&self, https: &[SocketAddr]) -> Vec<TestNode> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let first = self
            .start_node(0, https.first().copied().unwrap_or(any), vec![])
            .await;
        let seed = first.peer.to_string();
        let mut nodes = vec![first];
        for slot in 1..self.size as u16 {
            let http = https.get(usize::from(slot)).copied().unwrap_or(any);
            nodes.push(self.start_node(slot, http, vec![seed.clone()]).await);
        }
        wait_mesh(&nodes).await;
        nodes
    }
}

pub async fn wait_mesh(nodes: &[TestNode]) {
    let start = Instant::now();
    loop {
        let ready = nodes
            .iter()
            .all(|n| n.api.is_ready() && n.api.status().live.len() == nodes.len() - 1);
        if ready {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no full mesh of ready nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a proxy does with the bytes it relays.
#[derive(Default)]
struct ProxyState {
    /// Added before each chunk from client to node is passed on.
    delay_ms: AtomicU64,
    /// Swallow everything from client to node: the node never answers.
    blackhole: AtomicBool,
}

/// A TCP proxy on a loopback port in front of one node.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (s, t) = (state.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let handle = tokio::spawn(async move {
                    let Ok(node) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = node.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut nr, mut nw) = node.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if s.blackhole.load(Ordering::Relaxed) {
                                continue;
                            }
                            let d = s.delay_ms.load(Ordering::Relaxed);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            if nw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut nr, &mut cw).await;
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                let mut tasks = t.lock().unwrap();
                tasks.retain(|h| !h.is_finished());
                tasks.push(handle);
            }
        });
        Proxy {
            addr,
            state,
            tasks,
            accept,
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Relaxed);
    }

    /// Cuts every connection and stops listening: to a client, the node
    /// died (connections reset, new ones refused).
    pub fn kill(&self) {
        self.accept.abort();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// The p-th percentile of `samples` (sorted in place).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)]
}
