//! The RESP listener: threads, connections, limits.
//!
//! Like the HTTP API it runs one thread per core (at most 16), each with a
//! single-threaded runtime and its own `SO_REUSEPORT` listener, so that a
//! connection lives on one core from accept to close. A connection reads
//! what the socket has, answers every whole command in it in order (a
//! pipelined batch costs one read and one write), and writes the answers
//! before it reads again: a client that sends without reading is slowed by
//! its own unread answers, never buffered without bound.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::parse::{parse_command, FrameLimits, Parsed, ProtocolError, MAX_ARGS};
use super::reply;
use super::service::{Flow, RespService};
use crate::listen::{
    accept_loop, reuseport_listener, serve_threads, Admission, AdmissionLimits, Gate, Lag, Shed,
    Ticket,
};
use crate::metrics::Protocol;
use crate::service::Service;

/// What one client may hold of the RESP listener, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespLimits {
    /// Connections open at once, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
    /// A connection that sends nothing for this long is closed, and so is
    /// one whose answers cannot be written for this long.
    pub idle_timeout: Duration,
    /// Sizes of one command.
    pub frame: FrameLimits,
}

impl Default for RespLimits {
    fn default() -> Self {
        RespLimits {
            max_connections: crate::listen::MAX_CONNECTIONS,
            max_per_source: 1_024,
            idle_timeout: Duration::from_secs(300),
            frame: FrameLimits::default(),
        }
    }
}

/// Bytes read per `read` call; a pipelined batch larger than this is served
/// over several reads.
const READ_CHUNK: usize = 16 * 1024;

/// The bound, not yet serving, RESP listeners (one per thread).
pub struct RespListener {
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl RespListener {
    /// Binds `addr` once per RESP thread. Fails if the port is taken.
    pub async fn bind(addr: SocketAddr) -> io::Result<RespListener> {
        // SO_REUSEPORT would share a port another process of the same user
        // serves: make sure it is free first.
        if addr.port() != 0 {
            drop(TcpListener::bind(addr).await?);
        }
        let first = reuseport_listener(addr)?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..serve_threads() {
            listeners.push(reuseport_listener(addr)?);
        }
        Ok(RespListener { listeners, addr })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many threads [`RespListener::spawn`] starts.
    pub fn threads(&self) -> usize {
        self.listeners.len()
    }

    /// Starts one thread per listener. Each serves until `draining` turns
    /// true, lets every connection finish the batch it is answering, and
    /// sends its result on `done`. `admission` sheds batches of commands
    /// when the listener is overloaded (`-TRYAGAIN` for each command).
    pub fn spawn(
        self,
        service: Service,
        limits: RespLimits,
        admission: &AdmissionLimits,
        draining: watch::Receiver<bool>,
        done: tokio::sync::mpsc::Sender<io::Result<()>>,
    ) -> io::Result<usize> {
        let service = RespService::new(service);
        let gate = Arc::new(Gate::new(limits.max_connections, limits.max_per_source));
        let admission = Admission::new(admission.clone());
        let threads = self.listeners.len();
        for (i, listener) in self.listeners.into_iter().enumerate() {
            let edge = Edge {
                service: service.clone(),
                limits: limits.clone(),
                admission: admission.clone(),
                lag: (!admission.limits().queue_deadline.is_zero()).then(Lag::new),
            };
            let (draining, done, gate) = (draining.clone(), done.clone(), gate.clone());
            std::thread::Builder::new()
                .name(format!("drl-resp-{i}"))
                .spawn(move || {
                    let result = serve_thread(listener, edge, gate, draining);
                    let _ = done.blocking_send(result);
                })?;
        }
        Ok(threads)
    }
}

/// What every connection of one RESP thread shares.
#[derive(Clone)]
struct Edge {
    service: RespService,
    limits: RespLimits,
    admission: Arc<Admission>,
    /// This thread's measure of how far behind it is (none without a
    /// queue deadline).
    lag: Option<Arc<Lag>>,
}

fn serve_thread(
    listener: std::net::TcpListener,
    edge: Edge,
    gate: Arc<Gate>,
    draining: watch::Receiver<bool>,
) -> io::Result<()> {
    let lag = edge.lag.clone();
    accept_loop(
        listener,
        gate,
        lag,
        draining,
        "RESP",
        move |stream, ticket, draining| serve_connection(stream, ticket, edge.clone(), draining),
    )
}

/// Serves one connection until the client closes it or sends `QUIT`, a
/// protocol error, the idle timeout, or the server drains. A batch read
/// while the listener is overloaded is answered at once with one
/// `-TRYAGAIN` per command, and nothing is counted.
async fn serve_connection(
    mut stream: TcpStream,
    _ticket: Ticket,
    edge: Edge,
    mut draining: watch::Receiver<bool>,
) {
    let Edge {
        service,
        limits,
        admission,
        lag,
    } = edge;
    let mut conn = Connection::new(limits.frame);
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(limits.idle_timeout, conn.read_from(&mut stream)) => r,
            _ = draining.wait_for(|d| *d) => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let flow = match admission.admit(lag.as_deref()) {
            Ok(_in_flight) => conn.answer(&service).await,
            Err(shed) => {
                let metrics = service.service().metrics();
                for _ in 0..conn.shed(shed, admission.retry_after_secs()) {
                    metrics.count_shed(Protocol::Resp, shed.label());
                }
                Flow::Continue
            }
        };
        if !conn.out.is_empty() {
            let write = tokio::time::timeout(limits.idle_timeout, stream.write_all(&conn.out));
            if !matches!(write.await, Ok(Ok(()))) {
                return;
            }
            conn.out.clear();
        }
        if flow == Flow::Close {
            linger(stream).await;
            return;
        }
    }
}

/// Closes after the last answer: the write side first, then what the
/// client still sends is read and dropped for a moment (at most
/// [`LINGER_BYTES`], [`LINGER_TIME`]), so that unread input does not make
/// the kernel reset the connection before the client has read the answer.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    let mut dropped = 0;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            _ => return,
        }
    }
}

/// See [`linger`].
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_millis(500);

/// One connection's buffers: bytes received and not yet answered, and the
/// answers not yet written. I/O-free apart from `Connection::read_from`.
pub struct Connection {
    limits: FrameLimits,
    input: Vec<u8>,
    /// Where the unanswered bytes start in `input`.
    start: usize,
    /// The answers of the batch being served.
    pub out: Vec<u8>,
    args: Vec<Range<usize>>,
}

impl Connection {
    /// An empty connection bounded by `limits`.
    pub fn new(limits: FrameLimits) -> Connection {
        Connection {
            limits,
            input: Vec::with_capacity(READ_CHUNK),
            start: 0,
            out: Vec::with_capacity(1024),
            args: Vec::new(),
        }
    }

    /// Reads what the socket has (at most [`READ_CHUNK`] bytes).
    async fn read_from(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        // Answered bytes go before reading more, so the buffer holds at
        // most one unfinished command and one read.
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        let len = self.input.len();
        self.input.resize(len + READ_CHUNK, 0);
        let n = stream.read(&mut self.input[len..]).await;
        self.input.truncate(len + *n.as_ref().unwrap_or(&0));
        n
    }

    /// Appends bytes as if read (tests and fuzzing).
    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Answers every whole command received, in order, into `out`. A
    /// protocol error is answered and closes the connection.
    pub async fn answer(&mut self, service: &RespService) -> Flow {
        loop {
            let buf = &self.input[self.start..];
            match parse_command(buf, &self.limits, &mut self.args) {
                Ok(Parsed::Incomplete) => return Flow::Continue,
                Ok(Parsed::Command { len }) => {
                    // The parser never yields more than MAX_ARGS.
                    let mut argv: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
                    let n = self.args.len().min(MAX_ARGS);
                    for (slot, r) in argv.iter_mut().zip(&self.args) {
                        *slot = &buf[r.clone()];
                    }
                    let flow = service.execute(&argv[..n], &mut self.out).await;
                    self.start += len;
                    if flow == Flow::Close {
                        return Flow::Close;
                    }
                }
                Err(e) => {
                    protocol_error(&mut self.out, &e);
                    return Flow::Close;
                }
            }
        }
    }
}

impl Connection {
    /// Answers every whole command received with `-TRYAGAIN` and the
    /// reason, running none; returns how many. A protocol error is left
    /// for the next batch that is answered.
    pub fn shed(&mut self, shed: Shed, retry_after_secs: u64) -> usize {
        let message = shed.message(retry_after_secs);
        let mut n = 0;
        while let Ok(Parsed::Command { len }) =
            parse_command(&self.input[self.start..], &self.limits, &mut self.args)
        {
            reply::error_with(&mut self.out, "TRYAGAIN", &message);
            self.start += len;
            n += 1;
        }
        n
    }
}

fn protocol_error(out: &mut Vec<u8>, e: &ProtocolError) {
    reply::error(out, &format!("Protocol error: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shed_batch_answers_every_whole_command_with_tryagain_and_runs_none() {
        let mut c = Connection::new(FrameLimits::default());
        c.receive(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$1\r\na\r\n*1\r\n$4\r\nPI");
        assert_eq!(c.shed(Shed::Queue, 1), 2);
        let out = String::from_utf8(c.out.clone()).unwrap();
        assert_eq!(out.matches("-TRYAGAIN overloaded: ").count(), 2, "{out}");
        assert!(out.contains("retry after 1 s"), "{out}");
        assert!(!out.contains("PONG"));
        // The unfinished command waits for its end, and is answered alone.
        c.out.clear();
        c.receive(b"NG\r\n");
        assert_eq!(c.shed(Shed::InFlight, 2), 1);
        assert!(String::from_utf8_lossy(&c.out).contains("max_in_flight"));
    }
}
