//! A node with its HTTP API: start, serve, drain, stop.
//!
//! [`run`] is what `drl node` calls: it starts the node, serves the API until
//! `shutdown` resolves, lets in-flight requests finish (at most
//! [`DRAIN_TIMEOUT`]), then stops the node cleanly (final delta, leave,
//! snapshot). Tests use [`HttpNode`] directly to learn the bound address
//! when listening on port 0.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::{Listener, ListenerExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{router, AppState};
use crate::node::{Node, NodeError, NodeHandle, NodeSettings};

/// Most HTTP connections open at once over all HTTP threads; further
/// clients wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long a shutdown waits for in-flight requests before it stops the
/// node anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node with its API could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("HTTP server: {0}")]
    Serve(io::Error),
}

/// Starts a node from `settings`, serves its HTTP API on
/// `settings.listen_http` until `shutdown` resolves, drains, and stops the
/// node cleanly.
pub async fn run(
    settings: NodeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let node = HttpNode::start(settings).await?;
    tracing::info!(
        http = %node.http_addr(),
        peer = %node.node().peer_addr(),
        "node started"
    );
    node.serve(shutdown).await
}

/// A started node and its bound (not yet serving) HTTP listeners.
pub struct HttpNode {
    node: NodeHandle,
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    state: AppState,
}

/// How many threads serve HTTP: one per core, at most 16.
fn http_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
}

/// A listening socket with `SO_REUSEPORT`, so that each HTTP thread has its
/// own and the kernel spreads connections over them.
fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

impl HttpNode {
    /// Binds the HTTP listeners first, so that a taken port fails before
    /// the node joins its cluster; then starts the node.
    pub async fn start(settings: NodeSettings) -> Result<HttpNode, RunError> {
        let bind = settings.listen_http;
        let err = |source| RunError::Bind { addr: bind, source };
        // SO_REUSEPORT would let this node share a port that another process
        // of the same user already serves: make sure the port is free first.
        if bind.port() != 0 {
            drop(TcpListener::bind(bind).await.map_err(err)?);
        }
        let first = reuseport_listener(bind).map_err(err)?;
        let addr = first.local_addr().map_err(err)?;
        let mut listeners = vec![first];
        for _ in 1..http_threads() {
            listeners.push(reuseport_listener(addr).map_err(err)?);
        }
        let node = Node::start(settings).await?;
        let state = AppState::new(node.api());
        Ok(HttpNode {
            node,
            listeners,
            addr,
            state,
        })
    }

    /// The address the API listens on (the real port when bound to port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, waits for
    /// in-flight requests (idle keep-alive connections are closed at once)
    /// for at most [`DRAIN_TIMEOUT`], and shuts the node down.
    ///
    /// Each listener is served by its own thread with a single-threaded
    /// runtime: a connection lives on one thread from accept to close, so
    /// a request never waits for a wake-up from another core. The node's
    /// own task stays on the caller's runtime.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let HttpNode {
            node,
            listeners,
            state,
            ..
        } = self;
        let (draining_tx, draining) = tokio::sync::watch::channel(false);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let (done_tx, mut done) = tokio::sync::mpsc::channel::<io::Result<()>>(listeners.len());
        let threads = listeners.len();
        for (i, listener) in listeners.into_iter().enumerate() {
            let state = state.clone();
            let permits = permits.clone();
            let mut draining = draining.clone();
            let done_tx = done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("drl-http-{i}"))
                .spawn(move || {
                    let result = serve_thread(listener, state, permits, async move {
                        let _ = draining.wait_for(|d| *d).await;
                    });
                    let _ = done_tx.blocking_send(result);
                });
            if let Err(e) = spawned {
                let _ = draining_tx.send(true);
                node.shutdown().await;
                return Err(RunError::Serve(e));
            }
        }
        drop(done_tx);

        let mut result = Ok(());
        let mut finished = 0;
        tokio::pin!(shutdown);
        // Serve until asked to stop (or until a server thread fails).
        tokio::select! {
            () = &mut shutdown => {}
            r = done.recv() => {
                finished += 1;
                if let Some(Err(e)) = r {
                    result = Err(RunError::Serve(e));
                }
            }
        }
        tracing::info!("shutting down: draining HTTP requests");
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

/// One HTTP thread: a single-threaded runtime serving one listener until
/// `stop` resolves and its connections have drained.
fn serve_thread(
    listener: std::net::TcpListener,
    state: AppState,
    permits: Arc<Semaphore>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let listener = LimitedListener { listener, permits }.tap_io(|stream| {
            // Answers are small: send them at once rather than after the
            // peer's delayed ACK.
            let _ = stream.stream.set_nodelay(true);
        });
        axum::serve(listener, router(state))
            .with_graceful_shutdown(stop)
            .into_future()
            .await
    })
}

/// A TCP listener that holds at most `max` connections open.
struct LimitedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedStream, SocketAddr) {
        // The semaphore is never closed, so acquiring only waits.
        let permit = loop {
            if let Ok(p) = self.permits.clone().acquire_owned().await {
                break p;
            }
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    )
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that gives its permit back when dropped.
struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
