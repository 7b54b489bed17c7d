//! The composition root: one node and every front-end it serves.
//!
//! [`run`] is what `drl node` calls. [`Server::start`] binds every
//! configured listener first (HTTP, the operations port, gRPC, RESP), so
//! that a taken port fails before the node joins its cluster; then it
//! starts the node and builds the one [`Service`] all front-ends share.
//! [`Server::serve`] serves them side by side until `shutdown` resolves,
//! stops accepting, lets in-flight requests finish (at most
//! [`DRAIN_TIMEOUT`]), and stops the node cleanly (final delta, leave,
//! snapshot). Tests use [`Server`] directly to learn the bound addresses
//! when listening on port 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use crate::grpc::{GrpcError, GrpcListener};
use crate::http::{HttpLimits, HttpListeners};
use crate::listen::AdmissionLimits;
use crate::node::{Node, NodeError, NodeHandle, NodeSettings};
use crate::resp::{RespLimits, RespListener};
use crate::service::Service;

/// How long a shutdown waits for in-flight requests before it stops the
/// node anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client may hold of a node's listeners, and for how long.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerLimits {
    /// The HTTP decision and operations ports'.
    pub http: HttpLimits,
    /// The RESP listener's, when `resp_listen` is set.
    pub resp: RespLimits,
    /// Overload admission of each decision listener (HTTP, gRPC, RESP: each
    /// has its own requests in flight); the operations listener is never
    /// shed.
    pub admission: AdmissionLimits,
}

/// Why a node with its front-ends could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    /// The node could not start.
    Node(#[from] NodeError),
    #[error("cannot listen for {protocol} on {addr}: {source}")]
    /// A listener could not bind.
    Bind {
        /// `HTTP`, `RESP`.
        protocol: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    #[error(transparent)]
    /// The gRPC listener could not bind, load its TLS files or serve.
    Grpc(#[from] GrpcError),
    #[error("server: {0}")]
    /// A serving thread could not start or failed while serving.
    Serve(io::Error),
}

/// A started node with its bound (not yet serving) front-ends.
pub struct Server {
    node: NodeHandle,
    service: Service,
    http: HttpListeners,
    grpc: Option<GrpcListener>,
    resp: Option<RespListener>,
    limits: ServerLimits,
}

/// Starts a node from `settings`, serves every configured front-end until
/// `shutdown` resolves, drains, and stops the node cleanly.
pub async fn run(
    settings: NodeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_limits(settings, ServerLimits::default(), shutdown).await
}

/// [`run`] under explicit `limits` (`drl node` passes the `[overload]`
/// table's admission).
pub async fn run_with_limits(
    settings: NodeSettings,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let server = Server::start_with_limits(settings, limits).await?;
    let off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        http = %server.http_addr(),
        admin = %off(server.admin_addr()),
        grpc = %off(server.grpc_addr()),
        resp = %off(server.resp_addr()),
        peer = %server.node().peer_addr(),
        "node started"
    );
    crate::node::notices::warn_development_key_seed(&server.node().settings);
    crate::node::notices::warn_nothing_on_disk(&server.node().settings);
    let waiting = tokio::spawn(crate::node::notices::log_while_waiting(server.node().api()));
    let result = server.serve(shutdown).await;
    waiting.abort();
    result
}

impl Server {
    /// Binds every configured listener, then starts the node.
    pub async fn start(settings: NodeSettings) -> Result<Server, RunError> {
        Server::start_with_limits(settings, ServerLimits::default()).await
    }

    /// [`Server::start`] with explicit connection limits.
    pub async fn start_with_limits(
        settings: NodeSettings,
        limits: ServerLimits,
    ) -> Result<Server, RunError> {
        let http = HttpListeners::bind(settings.listen_http, settings.listen_admin)
            .await
            .map_err(|(addr, source)| RunError::Bind {
                protocol: "HTTP",
                addr,
                source,
            })?;
        let grpc = match settings.grpc_listen {
            Some(addr) => {
                let listener = GrpcListener::bind(addr).await?;
                Some(match &settings.grpc_tls {
                    Some(tls) => listener.with_tls(tls)?,
                    None => listener,
                })
            }
            None => None,
        };
        let resp = match settings.resp_listen {
            None => None,
            Some(addr) => {
                Some(
                    RespListener::bind(addr)
                        .await
                        .map_err(|source| RunError::Bind {
                            protocol: "RESP",
                            addr,
                            source,
                        })?,
                )
            }
        };
        let node = Node::start(settings).await?;
        let service = Service::new(node.api());
        Ok(Server {
            node,
            service,
            http,
            grpc,
            resp,
            limits,
        })
    }

    /// The HTTP decision port (the real port when bound to port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The operations listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.http.admin_addr()
    }

    /// The gRPC listener's address, when one is configured.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(GrpcListener::local_addr)
    }

    /// The RESP listener's address, when one is configured.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().map(RespListener::local_addr)
    }

    /// The running node.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// What the front-ends share.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Serves every front-end until `shutdown` resolves (or a serving
    /// thread fails), then stops accepting, waits for in-flight requests
    /// (idle keep-alive connections are closed at once) for at most
    /// [`DRAIN_TIMEOUT`], and shuts the node down.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let Server {
            node,
            service,
            http,
            grpc,
            resp,
            limits,
        } = self;
        let (draining_tx, draining) = watch::channel(false);
        let threads = http.threads() + resp.as_ref().map_or(0, RespListener::threads);
        let (done_tx, mut done) = tokio::sync::mpsc::channel::<io::Result<()>>(threads.max(1));
        let spawned = http
            .spawn(
                service.clone(),
                &limits.http,
                &limits.admission,
                node.settings.http2,
                draining.clone(),
                done_tx.clone(),
            )
            .and_then(|_| match resp {
                Some(resp) => resp.spawn(
                    service.clone(),
                    limits.resp.clone(),
                    &limits.admission,
                    draining.clone(),
                    done_tx.clone(),
                ),
                None => Ok(0),
            });
        drop(done_tx);
        if let Err(e) = spawned {
            let _ = draining_tx.send(true);
            node.shutdown().await;
            return Err(RunError::Serve(e));
        }
        let grpc_task = grpc.map(|grpc| {
            let mut stop = draining.clone();
            tokio::spawn(
                grpc.serve(service.clone(), limits.admission.clone(), async move {
                    let _ = stop.wait_for(|d| *d).await;
                }),
            )
        });

        let mut result = Ok(());
        let mut finished = 0;
        tokio::pin!(shutdown);
        // Serve until asked to stop (or until a serving thread fails).
        tokio::select! {
            () = &mut shutdown => {}
            r = done.recv() => {
                finished += 1;
                if let Some(Err(e)) = r {
                    result = Err(RunError::Serve(e));
                }
            }
        }
        tracing::info!("shutting down: draining requests");
        let _ = draining_tx.send(true);
        let drain = async {
            while finished < threads {
                match done.recv().await {
                    Some(Err(e)) if result.is_ok() => result = Err(RunError::Serve(e)),
                    Some(_) => {}
                    None => break,
                }
                finished += 1;
            }
            if let Some(task) = grpc_task {
                match task.await {
                    Ok(Err(e)) if result.is_ok() => result = Err(e.into()),
                    Ok(_) => {}
                    Err(e) => tracing::error!("gRPC server task: {e}"),
                }
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
        }
        match &node.settings.snapshot_path {
            Some(path) => {
                tracing::info!(snapshot = %path.display(), "stopping the node: final delta, leave, snapshot")
            }
            None => {
                tracing::info!("stopping the node: final delta, leave (no snapshot configured)")
            }
        }
        node.shutdown().await;
        result
    }
}
