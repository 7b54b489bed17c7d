//! A node with its HTTP API: start, serve, drain, stop.
//!
//! [`run`] is what `drl node` calls: it starts the node, serves the API until
//! `shutdown` resolves, lets in-flight requests finish (at most
//! [`DRAIN_TIMEOUT`]), then stops the node cleanly (final delta, leave,
//! snapshot). Tests use [`HttpNode`] directly to learn the bound address
//! when listening on port 0.
//!
//! # Connection limits
//!
//! Every connection of the decision port is held to [`HttpLimits`]: a
//! node-wide cap, a cap per source address (a connection over either is
//! accepted and closed at once, never left waiting in the backlog), a
//! deadline for the request head (slowloris), one for the body (see
//! [`super::body`]), and an idle timeout on keep-alive connections. The
//! optional operations listener (`listen_admin`) serves probes, metrics and
//! the rules admin on its own thread with its own connection budget, so a
//! flood of the decision port cannot fail a health probe.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use dashmap::DashMap;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::{operations_router, router, AppState};
use crate::node::{Node, NodeError, NodeHandle, NodeSettings};
use crate::resp::{RespLimits, RespListener, RespService};

/// Most HTTP connections the decision port holds open at once over all
/// HTTP threads (default of [`HttpLimits::max_connections`]).
pub const MAX_CONNECTIONS: usize = 16_384;

/// Most requests in flight on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// How long a shutdown waits for in-flight requests before it stops the
/// node anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client may hold of a listener, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once on the decision port, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
    /// From the moment a connection waits for a request until its head
    /// (request line and headers) has arrived in full.
    pub header_timeout: Duration,
    /// From the handler's first read until the body has arrived in full.
    pub body_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once on the operations listener.
    pub admin_max_connections: usize,
    /// Of those, from one source address.
    pub admin_max_per_source: usize,
    /// The RESP listener's limits, when `resp_listen` is set.
    pub resp: RespLimits,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: MAX_CONNECTIONS,
            max_per_source: 1_024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            admin_max_connections: 256,
            admin_max_per_source: 64,
            resp: RespLimits::default(),
        }
    }
}

/// Why a node with its API could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    /// The node could not start.
    Node(#[from] NodeError),
    #[error("cannot listen for RESP on {addr}: {source}")]
    /// The RESP listener could not bind.
    BindResp {
        /// The configured RESP address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    #[error("cannot listen for HTTP on {addr}: {source}")]
    /// The HTTP listener could not bind.
    Bind {
        /// The configured HTTP address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    #[error("HTTP server: {0}")]
    /// The HTTP server failed while serving.
    Serve(io::Error),
}

/// Starts a node from `settings`, serves its HTTP API on
/// `settings.listen_http` (and its operations listener on
/// `settings.listen_admin`, if set) until `shutdown` resolves, drains, and
/// stops the node cleanly.
pub async fn run(
    settings: NodeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let node = HttpNode::start(settings).await?;
    tracing::info!(
        http = %node.http_addr(),
        admin = ?node.admin_addr(),
        peer = %node.node().peer_addr(),
        "node started"
    );
    node.serve(shutdown).await
}

/// A started node and its bound (not yet serving) HTTP listeners.
pub struct HttpNode {
    node: NodeHandle,
    listeners: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    resp: Option<RespListener>,
    state: AppState,
    limits: HttpLimits,
}

/// How many threads serve a listener (HTTP, RESP): one per core, at most 16.
pub(crate) fn serve_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
}

/// A listening socket with `SO_REUSEPORT`, so that each HTTP thread has its
/// own and the kernel spreads connections over them.
pub(crate) fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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
        HttpNode::start_with_limits(settings, HttpLimits::default()).await
    }

    /// [`HttpNode::start`] with explicit connection limits.
    pub async fn start_with_limits(
        settings: NodeSettings,
        limits: HttpLimits,
    ) -> Result<HttpNode, RunError> {
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
        for _ in 1..serve_threads() {
            listeners.push(reuseport_listener(addr).map_err(err)?);
        }
        let (admin, admin_addr) = match settings.listen_admin {
            None => (None, None),
            Some(at) => {
                let err = |source| RunError::Bind { addr: at, source };
                let l = std::net::TcpListener::bind(at).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                let a = l.local_addr().map_err(err)?;
                (Some(l), Some(a))
            }
        };
        let resp = match settings.resp_listen {
            None => None,
            Some(at) => Some(
                RespListener::bind(at)
                    .await
                    .map_err(|source| RunError::BindResp { addr: at, source })?,
            ),
        };
        let node = Node::start(settings).await?;
        let state = AppState::with_body_timeout(node.api(), limits.body_timeout);
        Ok(HttpNode {
            node,
            listeners,
            admin,
            addr,
            admin_addr,
            resp,
            state,
            limits,
        })
    }

    /// The address the API listens on (the real port when bound to port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operations listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The RESP listener's address, when one is configured.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().map(RespListener::local_addr)
    }

    /// The running node.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// What the HTTP handlers share.
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
            admin,
            resp,
            state,
            limits,
            ..
        } = self;
        let http2 = node.settings.http2;
        let (draining_tx, draining) = watch::channel(false);
        let decisions = Arc::new(Gate::new(limits.max_connections, limits.max_per_source));
        let api = router(state.clone());
        let mut jobs: Vec<(String, std::net::TcpListener, Router, Arc<Gate>)> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| (format!("drl-http-{i}"), l, api.clone(), decisions.clone()))
            .collect();
        if let Some(l) = admin {
            let gate = Gate::new(limits.admin_max_connections, limits.admin_max_per_source);
            jobs.push((
                "drl-admin".into(),
                l,
                operations_router(state.clone()),
                Arc::new(gate),
            ));
        }
        let resp_threads = resp.as_ref().map_or(0, |r| r.threads());
        let (done_tx, mut done) =
            tokio::sync::mpsc::channel::<io::Result<()>>(jobs.len() + resp_threads);
        let threads = jobs.len() + resp_threads;
        if let Some(resp) = resp {
            let service = RespService::new(node.api());
            if let Err(e) = resp.spawn(
                service,
                limits.resp.clone(),
                draining.clone(),
                done_tx.clone(),
            ) {
                let _ = draining_tx.send(true);
                node.shutdown().await;
                return Err(RunError::Serve(e));
            }
        }
        for (name, listener, app, gate) in jobs {
            // The operations listener speaks HTTP/1.1 only.
            let http2 = http2 && name != "drl-admin";
            let draining = draining.clone();
            let done_tx = done_tx.clone();
            let limits = limits.clone();
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                let result = serve_thread(listener, app, gate, limits, http2, draining);
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
/// `draining` turns true and its connections have finished.
fn serve_thread(
    listener: std::net::TcpListener,
    app: Router,
    gate: Arc<Gate>,
    limits: HttpLimits,
    http2: bool,
    draining: watch::Receiver<bool>,
) -> io::Result<()> {
    accept_loop(
        listener,
        gate,
        draining,
        "HTTP",
        move |stream, ticket, draining| {
            serve_connection(stream, ticket, app.clone(), limits.clone(), http2, draining)
        },
    )
}

/// The accept loop of one listener thread, shared by the HTTP and RESP
/// listeners: a single-threaded runtime accepts until `draining` turns true,
/// admits each connection through `gate` (over a cap it is closed at once,
/// so the client learns now rather than after a timeout in the backlog),
/// and serves it as a task made by `serve`; then it waits for the open
/// connections to finish.
pub(crate) fn accept_loop<F, Fut>(
    listener: std::net::TcpListener,
    gate: Arc<Gate>,
    mut draining: watch::Receiver<bool>,
    protocol: &'static str,
    mut serve: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream, Ticket, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let mut connections = tokio::task::JoinSet::new();
        let for_connections = draining.clone();
        loop {
            tokio::select! {
                _ = draining.wait_for(|d| *d) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(ticket) = gate.admit(peer.ip()) else {
                            drop(stream);
                            continue;
                        };
                        // Answers are small: send them at once rather than
                        // after the peer's delayed ACK.
                        let _ = stream.set_nodelay(true);
                        connections.spawn(serve(stream, ticket, for_connections.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, protocol, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
        Ok(())
    })
}

/// Serves one connection until it closes, is idle too long, or the server
/// drains (then the request in flight finishes and the connection closes).
///
/// HTTP/1.1 requests pipelined on a connection are answered in order, and
/// answers ready together leave in one write (`pipeline_flush`). With
/// `http2`, a connection that opens with the HTTP/2 preface is served as
/// h2c (prior knowledge); any other as HTTP/1.1.
async fn serve_connection(
    stream: TcpStream,
    _ticket: Ticket,
    app: Router,
    limits: HttpLimits,
    http2: bool,
    mut draining: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched {
        stream,
        start,
        activity: activity.clone(),
    });
    let service = TowerToHyperService::new(app);
    // Both connection types have the same driving loop.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                let idle_at = start + last + limits.idle_timeout;
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = draining.wait_for(|d| *d), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = tokio::time::sleep_until(idle_at.into()) => {
                        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                        if start.elapsed() >= last + limits.idle_timeout {
                            // Dropping the connection closes the socket.
                            break;
                        }
                    }
                }
            }
        }};
    }
    if http2 {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .pipeline_flush(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
        drive!(builder.serve_connection(io, service));
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .pipeline_flush(true);
        drive!(builder.serve_connection(io, service));
    }
}

/// Connection caps of one listener: in all, and per source address.
pub(crate) struct Gate {
    max: usize,
    max_per_source: usize,
    open: AtomicUsize,
    by_source: DashMap<IpAddr, usize>,
}

impl Gate {
    pub(crate) fn new(max: usize, max_per_source: usize) -> Gate {
        Gate {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            open: AtomicUsize::new(0),
            by_source: DashMap::new(),
        }
    }

    /// A ticket for one more connection from `source`, or `None` when a cap
    /// is reached.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Ticket> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut count = self.by_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            drop(count);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *count += 1;
        drop(count);
        Some(Ticket {
            gate: self.clone(),
            source,
        })
    }
}

/// One admitted connection; gives its place back when dropped.
pub(crate) struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.by_source.remove_if_mut(&self.source, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that records when it last moved a byte (milliseconds since
/// `start`), for the idle timeout.
struct Watched {
    stream: TcpStream,
    start: Instant,
    activity: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        self.activity
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
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
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_each_source_and_the_total() {
        let gate = Arc::new(Gate::new(3, 2));
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let t1 = gate.admit(a).unwrap();
        let t2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per-source cap");
        let t3 = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "total cap");
        drop(t1);
        let t4 = gate.admit(a).unwrap();
        drop((t2, t3, t4));
        assert_eq!(gate.open.load(Ordering::Relaxed), 0);
        assert!(
            gate.by_source.is_empty(),
            "no entry is left for a gone source"
        );
    }
}
