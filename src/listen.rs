//! What every TCP listener of a node shares (HTTP, the operations port,
//! RESP): sockets spread over threads with `SO_REUSEPORT`, one accept loop
//! per thread on its own single-threaded runtime, connection caps in all
//! and per source address ([`Gate`]), and overload admission of requests
//! ([`Admission`], also used by gRPC): a cap on the requests in flight and
//! a queue deadline, measured as how far behind its schedule the serving
//! runtime is ([`Lag`]). The protocol front-ends only say how to serve one
//! connection, and how to answer a shed request.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// Most connections a decision listener holds open at once over all its
/// threads (the default of `ServerLimits::max_connections`).
pub const MAX_CONNECTIONS: usize = 16_384;

/// How many threads serve a listener (HTTP, RESP): one per core, at most 16.
pub fn serve_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
}

/// A listening socket with `SO_REUSEPORT`, so that each HTTP thread has its
/// own and the kernel spreads connections over them.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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

/// The accept loop of one listener thread, shared by the HTTP and RESP
/// listeners: a single-threaded runtime accepts until `draining` turns true,
/// admits each connection through `gate` (over a cap it is closed at once,
/// so the client learns now rather than after a timeout in the backlog),
/// and serves it as a task made by `serve`; then it waits for the open
/// connections to finish.
pub fn accept_loop<F, Fut>(
    listener: std::net::TcpListener,
    gate: Arc<Gate>,
    lag: Option<Arc<Lag>>,
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
        // The probe measures this thread's runtime: it runs beside the
        // connections and ends with the loop.
        let probe = lag.map(|lag| tokio::spawn(lag.probe()));
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
        if let Some(probe) = probe {
            probe.abort();
        }
        Ok(())
    })
}

/// Connection caps of one listener: in all, and per source address.
pub struct Gate {
    max: usize,
    max_per_source: usize,
    open: AtomicUsize,
    by_source: DashMap<IpAddr, usize>,
}

impl Gate {
    /// At most `max` connections, `max_per_source` from one address (each
    /// at least 1).
    pub fn new(max: usize, max_per_source: usize) -> Gate {
        Gate {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            open: AtomicUsize::new(0),
            by_source: DashMap::new(),
        }
    }

    /// A ticket for one more connection from `source`, or `None` when a cap
    /// is reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Ticket> {
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
pub struct Ticket {
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

/// Overload admission of one listener's requests (HTTP, gRPC, RESP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Most requests in flight at once over the listener's threads (from
    /// admission until answered, a confirmation round trip included); one
    /// more is shed. 0: no cap.
    pub max_in_flight: usize,
    /// A request that finds its serving runtime further behind its
    /// schedule than this (it waited about that long in the run queue) is
    /// shed. Zero (the default): no deadline. Off by default because a
    /// machine that is busy with other work delays the runtime too, and a
    /// shed request is a refusal its client sees.
    pub queue_deadline: Duration,
    /// What a shed request is told to wait before it tries again (whole
    /// seconds, at least 1, as `Retry-After` has them).
    pub retry_after: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_in_flight: 4_096,
            queue_deadline: Duration::ZERO,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The `[overload]` table of a node's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadFile {
    /// Most requests in flight on each decision listener; 0: no cap.
    pub max_in_flight: usize,
    /// Longest wait to be served before a request is shed ("0s": never).
    pub queue_deadline: String,
}

impl Default for OverloadFile {
    fn default() -> Self {
        OverloadFile {
            max_in_flight: AdmissionLimits::default().max_in_flight,
            queue_deadline: "0s".into(),
        }
    }
}

impl OverloadFile {
    /// The limits the table sets; `Err` names a bad field.
    pub fn limits(&self) -> Result<AdmissionLimits, String> {
        let deadline = drl_core::time::parse_duration(&self.queue_deadline)
            .map_err(|e| format!("[overload] queue_deadline: {e}"))?;
        Ok(AdmissionLimits {
            max_in_flight: self.max_in_flight,
            queue_deadline: deadline.into(),
            ..AdmissionLimits::default()
        })
    }
}

/// Why a request was shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// The listener had `max_in_flight` requests in flight.
    InFlight,
    /// The serving runtime was further behind than `queue_deadline`.
    Queue,
}

impl Shed {
    /// The `reason` label of `drl_shed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Shed::InFlight => "in_flight",
            Shed::Queue => "queue",
        }
    }

    /// What the client is told, in words.
    pub fn message(self, retry_after_secs: u64) -> String {
        let why = match self {
            Shed::InFlight => "too many requests in flight (max_in_flight)",
            Shed::Queue => "requests wait longer than queue_deadline",
        };
        format!("overloaded: {why}; nothing was counted, retry after {retry_after_secs} s")
    }
}

/// The admission of one listener: its limits and the requests in flight.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    in_flight: AtomicUsize,
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Admits one request served by the runtime `lag` measures (none: no
    /// queue deadline applies), or says why it is shed. The request is in
    /// flight until the [`InFlight`] is dropped.
    pub fn admit(self: &Arc<Self>, lag: Option<&Lag>) -> Result<InFlight, Shed> {
        let deadline = self.limits.queue_deadline;
        if !deadline.is_zero() && lag.is_some_and(|l| l.behind() > deadline) {
            return Err(Shed::Queue);
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.limits.max_in_flight > 0 && before >= self.limits.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Shed::InFlight);
        }
        Ok(InFlight {
            admission: self.clone(),
        })
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.limits
            .retry_after
            .as_secs()
            .saturating_add(u64::from(self.limits.retry_after.subsec_nanos() > 0))
            .max(1)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One admitted request; leaves the flight when dropped.
#[derive(Debug)]
pub struct InFlight {
    admission: Arc<Admission>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a [`Lag`] probe looks at its runtime.
const LAG_PERIOD: Duration = Duration::from_millis(5);

/// How far behind its schedule one runtime is: a probe task on it sleeps
/// 5 ms (`LAG_PERIOD`) at a time and notes how late it was woken, which is
/// about how long a task that becomes ready now waits in the run queue.
/// While the probe is overdue, how overdue it is counts too, so a runtime
/// that falls behind is seen before the probe runs again.
#[derive(Debug)]
pub struct Lag {
    origin: std::time::Instant,
    /// When the probe is due next, in nanoseconds since `origin`.
    due: AtomicU64,
    /// How late the probe ran last time, in nanoseconds.
    last: AtomicU64,
}

impl Lag {
    /// A measure with no probe running yet (it reads 0 until one runs).
    pub fn new() -> Arc<Lag> {
        Arc::new(Lag {
            origin: std::time::Instant::now(),
            due: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// How far behind the runtime is now.
    pub fn behind(&self) -> Duration {
        let overdue = self.now().saturating_sub(self.due.load(Ordering::Relaxed));
        Duration::from_nanos(overdue.max(self.last.load(Ordering::Relaxed)))
    }

    /// The probe: run it as a task of the runtime to measure; it never
    /// ends by itself (abort it).
    pub async fn probe(self: Arc<Self>) {
        loop {
            let due = std::time::Instant::now() + LAG_PERIOD;
            self.due.store(
                u64::try_from(due.duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            tokio::time::sleep_until(due.into()).await;
            // tokio's timers have a 1 ms resolution: a timer is due up to
            // that late on an idle runtime.
            let late = std::time::Instant::now()
                .saturating_duration_since(due)
                .saturating_sub(Duration::from_millis(1));
            self.last.store(
                u64::try_from(late.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overload_table_sets_the_limits_and_a_bad_deadline_is_named() {
        let file: OverloadFile =
            toml::from_str("max_in_flight = 8\nqueue_deadline = \"5ms\"\n").unwrap();
        let limits = file.limits().unwrap();
        assert_eq!(limits.max_in_flight, 8);
        assert_eq!(limits.queue_deadline, Duration::from_millis(5));
        assert_eq!(
            OverloadFile::default().limits().unwrap(),
            AdmissionLimits::default()
        );
        let bad = OverloadFile {
            queue_deadline: "soon".into(),
            ..OverloadFile::default()
        };
        assert!(bad.limits().unwrap_err().contains("queue_deadline"));
        assert!(toml::from_str::<OverloadFile>("max_in_fligth = 1\n").is_err());
    }

    #[test]
    fn admission_caps_requests_in_flight_and_gives_places_back() {
        let admission = Admission::new(AdmissionLimits {
            max_in_flight: 2,
            queue_deadline: Duration::ZERO,
            retry_after: Duration::from_millis(1_500),
        });
        let a = admission.admit(None).unwrap();
        let b = admission.admit(None).unwrap();
        assert_eq!(admission.admit(None).unwrap_err(), Shed::InFlight);
        assert_eq!(admission.in_flight(), 2, "a shed request holds no place");
        drop(a);
        let c = admission.admit(None).unwrap();
        drop((b, c));
        assert_eq!(admission.in_flight(), 0);
        assert_eq!(
            admission.retry_after_secs(),
            2,
            "rounded up to whole seconds"
        );
    }

    #[test]
    fn a_runtime_behind_its_deadline_sheds_and_one_on_time_admits() {
        let admission = Admission::new(AdmissionLimits {
            max_in_flight: 0,
            queue_deadline: Duration::from_millis(5),
            retry_after: Duration::from_secs(1),
        });
        // A measure that has run for a second.
        let lag = Lag {
            origin: std::time::Instant::now() - Duration::from_secs(1),
            due: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
        };
        assert!(
            admission.admit(Some(&lag)).is_ok(),
            "no probe ran yet: on time"
        );
        lag.last.store(20_000_000, Ordering::Relaxed);
        assert_eq!(admission.admit(Some(&lag)).unwrap_err(), Shed::Queue);
        lag.last.store(0, Ordering::Relaxed);
        // The probe was due 50 ms ago and has not run: the runtime is stuck.
        let now = lag.now();
        lag.due
            .store(now.saturating_sub(50_000_000), Ordering::Relaxed);
        assert_eq!(admission.admit(Some(&lag)).unwrap_err(), Shed::Queue);
        lag.due.store(now + 5_000_000, Ordering::Relaxed);
        assert!(admission.admit(Some(&lag)).is_ok());
    }

    #[test]
    fn the_probe_follows_a_blocked_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lag = Lag::new();
        rt.block_on(async {
            let probe = tokio::spawn(lag.clone().probe());
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Idle: on time, give or take a loaded machine's scheduling.
            assert!(
                lag.behind() < Duration::from_millis(25),
                "{:?}",
                lag.behind()
            );
            // Block the runtime's only thread: the probe cannot run.
            std::thread::sleep(Duration::from_millis(30));
            assert!(
                lag.behind() >= Duration::from_millis(20),
                "{:?}",
                lag.behind()
            );
            probe.abort();
        });
    }

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
