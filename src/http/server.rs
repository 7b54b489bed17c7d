//! The HTTP listeners of a node: the decision port (one `SO_REUSEPORT`
//! socket per thread) and the optional operations port (`listen_admin`),
//! each connection served by hyper under the node's [`HttpLimits`].
//!
//! The decision port is held to a node-wide connection cap, a cap per
//! source address (a connection over either is accepted and closed at
//! once, never left waiting in the backlog), a deadline for the request
//! head (slowloris), one for the body (see [`super::body`]), and an idle
//! timeout on keep-alive connections. The operations listener serves
//! probes, metrics and the rules admin on its own thread with its own
//! connection budget, so a flood of the decision port cannot fail a health
//! probe. The composition root (`server`) binds and starts them beside
//! the other front-ends.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{operations_router, router, AppState};
use crate::listen::{
    accept_loop, reuseport_listener, serve_threads, Admission, AdmissionLimits, Gate, InFlight,
    Lag, Shed, Ticket, MAX_CONNECTIONS,
};
use crate::metrics::Protocol;
use crate::service::Service;

/// Most requests in flight on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// What one client may hold of the HTTP listeners, and for how long.
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
        }
    }
}

/// The bound, not yet serving, HTTP listeners.
pub struct HttpListeners {
    listeners: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

impl HttpListeners {
    /// Binds the decision port at `at` (one socket per serving thread) and,
    /// when given, the operations port at `admin`. Port 0 picks a free
    /// port. `Err` names the address that could not be bound.
    pub async fn bind(
        at: SocketAddr,
        admin: Option<SocketAddr>,
    ) -> Result<HttpListeners, (SocketAddr, io::Error)> {
        let err = |source| (at, source);
        // SO_REUSEPORT would let this node share a port that another process
        // of the same user already serves: make sure the port is free first.
        if at.port() != 0 {
            drop(TcpListener::bind(at).await.map_err(err)?);
        }
        let first = reuseport_listener(at).map_err(err)?;
        let addr = first.local_addr().map_err(err)?;
        let mut listeners = vec![first];
        for _ in 1..serve_threads() {
            listeners.push(reuseport_listener(addr).map_err(err)?);
        }
        let (admin, admin_addr) = match admin {
            None => (None, None),
            Some(at) => {
                let err = |source| (at, source);
                let l = std::net::TcpListener::bind(at).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                let a = l.local_addr().map_err(err)?;
                (Some(l), Some(a))
            }
        };
        Ok(HttpListeners {
            listeners,
            admin,
            addr,
            admin_addr,
        })
    }

    /// The decision port's address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operations port's address, when one is bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Starts one thread per listener, each with a single-threaded runtime:
    /// a connection lives on one thread from accept to close, so a request
    /// never waits for a wake-up from another core. Each serves until
    /// `draining` turns true, lets its connections finish, and sends its
    /// result on `done`. Returns how many threads were started.
    pub fn spawn(
        self,
        service: Service,
        limits: &HttpLimits,
        admission: &AdmissionLimits,
        http2: bool,
        draining: watch::Receiver<bool>,
        done: tokio::sync::mpsc::Sender<io::Result<()>>,
    ) -> io::Result<usize> {
        let state = AppState::new(service.clone(), limits.body_timeout);
        let decisions = Arc::new(Gate::new(limits.max_connections, limits.max_per_source));
        let api = router(state.clone());
        let admission = Admission::new(admission.clone());
        let mut jobs: Vec<Job> = self
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| Job {
                name: format!("drl-http-{i}"),
                listener: l,
                app: api.clone(),
                gate: decisions.clone(),
                http2,
                admission: Some(admission.clone()),
                direct: Some(state.clone()),
            })
            .collect();
        if let Some(l) = self.admin {
            let gate = Gate::new(limits.admin_max_connections, limits.admin_max_per_source);
            // The operations listener speaks HTTP/1.1 only, and is never
            // shed: a probe must always be answered.
            jobs.push(Job {
                name: "drl-admin".into(),
                listener: l,
                app: operations_router(state),
                gate: Arc::new(gate),
                http2: false,
                admission: None,
                direct: None,
            });
        }
        let threads = jobs.len();
        for job in jobs {
            let limits = limits.clone();
            let (draining, done, service) = (draining.clone(), done.clone(), service.clone());
            std::thread::Builder::new()
                .name(job.name.clone())
                .spawn(move || {
                    let result = serve_thread(job, service, limits, draining);
                    let _ = done.blocking_send(result);
                })?;
        }
        Ok(threads)
    }

    /// How many serving threads [`HttpListeners::spawn`] starts.
    pub fn threads(&self) -> usize {
        self.listeners.len() + usize::from(self.admin.is_some())
    }
}

/// What one HTTP thread serves.
struct Job {
    name: String,
    listener: std::net::TcpListener,
    app: Router,
    gate: Arc<Gate>,
    http2: bool,
    /// The decision port's admission (shared by its threads); none on the
    /// operations listener.
    admission: Option<Arc<Admission>>,
    /// The decision port's state, for the routes served without the router.
    direct: Option<AppState>,
}

/// One HTTP thread: a single-threaded runtime serving one listener until
/// `draining` turns true and its connections have finished.
fn serve_thread(
    job: Job,
    service: Service,
    limits: HttpLimits,
    draining: watch::Receiver<bool>,
) -> io::Result<()> {
    let Job {
        listener,
        app,
        gate,
        http2,
        admission,
        direct,
        ..
    } = job;
    // This thread's own measure of how far behind it is.
    let lag = admission
        .as_ref()
        .filter(|a| !a.limits().queue_deadline.is_zero())
        .map(|_| Lag::new());
    let admitted = Admitted {
        inner: TowerToHyperService::new(app),
        direct,
        admission: admission.map(|admission| AdmissionState {
            admission,
            lag: lag.clone(),
            service,
        }),
    };
    accept_loop(
        listener,
        gate,
        lag,
        draining,
        "HTTP",
        move |stream, ticket, draining| {
            serve_connection(
                stream,
                ticket,
                admitted.clone(),
                limits.clone(),
                http2,
                draining,
            )
        },
    )
}

/// The decision port's router behind overload admission: a request that
/// would exceed `max_in_flight`, or that finds its thread further behind
/// than `queue_deadline`, is answered at once with a 503 and
/// `Retry-After`, and nothing is counted. Probes and metrics are never
/// shed.
#[derive(Clone)]
struct Admitted {
    inner: TowerToHyperService<Router>,
    admission: Option<AdmissionState>,
    /// On the decision port: `GET /v1/allow` is served without the router.
    direct: Option<AppState>,
}

#[derive(Clone)]
struct AdmissionState {
    admission: Arc<Admission>,
    lag: Option<Arc<Lag>>,
    service: Service,
}

/// Paths that are never shed: a probe or a scrape under overload must
/// still be answered.
fn never_shed(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for Admitted {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = AdmittedFuture;

    fn call(&self, request: axum::http::Request<hyper::body::Incoming>) -> AdmittedFuture {
        let in_flight = match &self.admission {
            Some(a) if !never_shed(request.uri().path()) => {
                match a.admission.admit(a.lag.as_deref()) {
                    Ok(flight) => Some(flight),
                    Err(shed) => {
                        a.service.metrics().count_shed(Protocol::Http, shed.label());
                        let retry_after = a.admission.retry_after_secs();
                        return AdmittedFuture::Shed(Some(overloaded(shed, retry_after)));
                    }
                }
            }
            _ => None,
        };
        if let Some(state) = &self.direct {
            if request.method() == axum::http::Method::GET && request.uri().path() == "/v1/allow" {
                let query = request.uri().query().map(str::to_owned);
                return AdmittedFuture::Direct {
                    future: Box::pin(super::check::allow_direct(state.clone(), query)),
                    _in_flight: in_flight,
                };
            }
        }
        AdmittedFuture::Admitted {
            future: self.inner.call(request),
            _in_flight: in_flight,
        }
    }
}

/// The answer to a shed request: 503, `Retry-After`, and the reason.
fn overloaded(shed: Shed, retry_after: u64) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = super::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        shed.message(retry_after),
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(retry_after),
    );
    response
}

/// The future of [`Admitted`]: the router's or a direct route's, holding
/// the request's place in flight until it is answered, or a ready 503.
enum AdmittedFuture {
    Admitted {
        future: hyper_util::service::TowerToHyperServiceFuture<
            Router,
            axum::http::Request<hyper::body::Incoming>,
        >,
        /// Held, not read: the request's place in flight.
        _in_flight: Option<InFlight>,
    },
    /// A route served without the router.
    Direct {
        future: Pin<Box<dyn std::future::Future<Output = axum::response::Response> + Send>>,
        /// Held, not read: the request's place in flight.
        _in_flight: Option<InFlight>,
    },
    Shed(Option<axum::response::Response>),
}

impl std::future::Future for AdmittedFuture {
    type Output = Result<axum::response::Response, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            AdmittedFuture::Admitted { future, .. } => Pin::new(future).poll(cx),
            AdmittedFuture::Direct { future, .. } => future.as_mut().poll(cx).map(Ok),
            AdmittedFuture::Shed(response) => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Polled again after it was ready: a bug of the caller's.
                None => Poll::Pending,
            },
        }
    }
}

/// Serves one connection until it closes, is idle too long, or the server
/// drains (then the request in flight finishes and the connection closes).
///
/// HTTP/1.1 requests pipelined on a connection are answered in order. A
/// request head that does not parse gets a 400 and the connection closes,
/// after every request before it on the connection was answered. hyper's
/// `pipeline_flush` is off: it holds answers back while unread bytes wait
/// in the read buffer, and bytes that never parse stay there, so the
/// answers before them and the 400 were dropped with the connection. With
/// `http2`, a connection that opens with the HTTP/2 preface is served as
/// h2c (prior knowledge); any other as HTTP/1.1.
async fn serve_connection(
    stream: TcpStream,
    _ticket: Ticket,
    app: Admitted,
    limits: HttpLimits,
    http2: bool,
    mut draining: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched::new(stream, start, activity.clone(), http2));
    let service = app;
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
            .pipeline_flush(false);
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
            .pipeline_flush(false);
        drive!(builder.serve_connection(io, service));
    }
}

/// A TCP stream that records when it last moved a byte (milliseconds since
/// `start`), for the idle timeout, and writes answers once per batch of
/// requests rather than once per answer.
///
/// hyper flushes after every answer (`pipeline_flush` is off, see
/// [`serve_connection`]), which costs pipelining clients one `write` per
/// request. Here a flush only marks the answers as owed: they go out when
/// the connection has nothing more to read (hyper has answered every
/// request the client sent so far and waits for the next), when
/// [`FLUSH_AT`] bytes are owed, when the connection shuts down, and, as a
/// last attempt without waiting, when it is dropped (hyper drops a
/// connection after a protocol error without flushing; the 400 and the
/// answers before it fit in the socket's buffer).
///
/// HTTP/2 writes through at once: h2 already gathers a connection's
/// frames, and it writes them after its read has come back empty, which
/// would leave them owed. On a port that speaks both, the first bytes the
/// server writes say which one the connection speaks (an HTTP/1 answer
/// starts with its status line, h2 with a SETTINGS frame).
struct Watched {
    stream: TcpStream,
    start: Instant,
    activity: Arc<AtomicU64>,
    /// Answer bytes accepted but not yet written to the socket.
    owed: Vec<u8>,
    /// Whether answers are gathered per batch: known for HTTP/1.1 alone,
    /// learnt from the first write where h2c is on.
    batch: Option<bool>,
}

/// Owed bytes beyond which answers are written without waiting for the
/// end of the batch.
const FLUSH_AT: usize = 16 * 1024;

impl Watched {
    fn new(stream: TcpStream, start: Instant, activity: Arc<AtomicU64>, http2: bool) -> Self {
        Watched {
            stream,
            start,
            activity,
            owed: Vec::new(),
            batch: (!http2).then_some(true),
        }
    }
    /// Whether writes starting with `first` are gathered per batch.
    fn batching(&mut self, first: &[u8]) -> bool {
        *self
            .batch
            .get_or_insert_with(|| first.starts_with(b"HTTP/1."))
    }
    fn touch(&self) {
        self.activity
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Writes every owed byte to the socket.
    fn poll_pay(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.owed.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.owed) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.owed.drain(..n);
                    self.touch();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
    /// Takes `len` bytes of answers, paying what is owed first if that is
    /// already [`FLUSH_AT`] or more.
    fn poll_owe(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.owed.len() >= FLUSH_AT || self.owed.len() + len > 4 * FLUSH_AT {
            return self.poll_pay(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.owed.is_empty() {
            let _ = self.stream.try_write(&self.owed);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            // Every request read so far is answered: the batch ends here.
            Poll::Pending => match self.poll_pay(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.batching(buf) {
            let r = Pin::new(&mut self.stream).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.touch();
            }
            return r;
        }
        std::task::ready!(self.poll_owe(cx, buf.len()))?;
        self.owed.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.batch == Some(true) {
            // Owed, paid at the end of the batch (see the type's docs).
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pay(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if !self.batching(first) {
            let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.touch();
            }
            return r;
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        std::task::ready!(self.poll_owe(cx, len))?;
        for b in bufs {
            self.owed.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
