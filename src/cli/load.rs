//! `drl load`: a load generator for the HTTP API.
//!
//! `--connections` keep-alive HTTP/1.1 connections, spread round-robin over
//! the nodes, each sending `POST /v1/check` one after the other (no
//! pipelining) with a user drawn uniformly from `--keys` users. Without
//! `--rate` every connection sends as fast as answers come back (closed
//! loop: the peak throughput). With `--rate` the requests follow a fixed
//! schedule (open loop). A request sent late because the answer to the
//! previous one on its connection came late has its latency measured from
//! the moment it was scheduled, not sent, so a server stall counts against
//! every request it delayed (no coordinated omission). The schedule is kept
//! by one pacing thread that sleeps with microsecond precision and hands
//! each connection its turn: tokio's timers have a 1 ms resolution, and
//! with them every request due within one millisecond went out in one
//! burst (36 at once at 36,000/s), so the server queued bursts the rate did
//! not ask for. A request sent late only because the generator woke late
//! is measured from when it was sent: that delay is the generator's, not
//! the server's.
//!
//! With `--resp` the nodes are RESP addresses (`host:port`) and each request
//! is `CL.THROTTLE user-<n> <burst> <count> <period>` (`--cell`), one in
//! flight per connection, paced and measured the same way.
//!
//! Every mode waits at most `--timeout` for an answer (then counts an error,
//! with its reason, and opens the connection again) and prints a progress
//! line every `--progress`. An overloaded node's fast refusal (HTTP 503
//! with `Retry-After`, RESP `-TRYAGAIN`) is counted as shed, apart from
//! the decisions and the errors, with its own latency; with
//! `--honor-retry-after` the connection then waits about as long as it was
//! told (between half and one and a half times, so that the connections
//! shed together do not come back together).
//! `--source` spreads the connections over local addresses (127.0.0.2,
//! 127.0.0.3, ...), to stay under a node's cap of connections per source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use super::load_report::LoadReport;
use super::load_report::{print_report, refusal_reason, Progress};
use super::{parse_fields, CliError};
use crate::http::client::{authority, Connection};

/// `drl load`: where to send, how hard and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Node HTTP addresses, comma-separated: http://127.0.0.1:8400,http://127.0.0.1:8401
    #[arg(long, value_delimiter = ',', required = true)]
    pub node: Vec<String>,
    /// Keep-alive connections, spread over the nodes.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// How long to send ("10s").
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Total requests per second over all connections (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Distinct users to draw from.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// The descriptor field that carries the drawn user.
    #[arg(long, default_value = "user")]
    pub user_field: String,
    /// Extra descriptor fields sent with every request, as name=value.
    #[arg(short = 'f', long = "field")]
    pub fields: Vec<String>,
    /// Cost of each request.
    #[arg(long, default_value_t = 1)]
    pub cost: u32,
    /// Threads of the generator's runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the user draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Speak RESP to the nodes' RESP listeners (`--node 127.0.0.1:6380`)
    /// with `CL.THROTTLE` instead of HTTP.
    #[arg(long)]
    pub resp: bool,
    /// `CL.THROTTLE`'s max_burst, count_per_period and period with --resp.
    #[arg(long, default_value = "99 10 1")]
    pub cell: String,
    /// Longest wait for one answer; a request not answered by then counts as
    /// an error (`timeout`) and its connection is opened again.
    #[arg(long, default_value = "2s")]
    pub timeout: String,
    /// Print a progress line to stderr every this long ("0s": never).
    #[arg(long, default_value = "1s")]
    pub progress: String,
    /// Local addresses to connect from, comma-separated, used in turn by
    /// the connections (default: any).
    #[arg(long, value_delimiter = ',')]
    pub source: Vec<std::net::IpAddr>,
    /// After a shed answer (503 or `-TRYAGAIN`), wait about as long as its
    /// `Retry-After` says (RESP: 1 s), spread over half to one and a half
    /// times that, before the connection's next request, as a well-behaved
    /// client does.
    #[arg(long)]
    pub honor_retry_after: bool,
}

/// A wait of `secs` seconds spread over [0.5, 1.5) of it, so that the
/// clients a node shed at once do not all come back at once.
pub(super) fn jittered(secs: u64, rng: &mut SplitMix) -> Duration {
    let spread = 0.5 + (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    Duration::from_secs_f64(secs as f64 * spread)
}

/// The source address of connection `i`, if `--source` names any.
pub(super) fn source_of(args: &LoadArgs, i: usize) -> Option<std::net::IpAddr> {
    (!args.source.is_empty()).then(|| args.source[i % args.source.len()])
}

/// A small, seeded generator (SplitMix64): the same seed draws the same users.
pub(super) struct SplitMix(pub(super) u64);

impl SplitMix {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Escapes a string for a JSON body.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `drl load`: runs the load, then prints throughput and latency quantiles.
/// Fails on arguments that cannot work (no connections, no keys, a bad
/// duration or rate) or if a connection cannot be opened at the start.
pub fn run_load(args: &LoadArgs) -> Result<(), CliError> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let report = runtime.block_on(generate(args))?;
    print_report(args, &report);
    Ok(())
}

/// Runs the load and returns what it measured.
pub async fn generate(args: &LoadArgs) -> Result<LoadReport, CliError> {
    if args.connections == 0 || args.node.is_empty() {
        return Err(CliError::Usage(
            "need at least one node and one connection".into(),
        ));
    }
    if args.keys == 0 {
        return Err(CliError::Usage("--keys must be at least 1".into()));
    }
    let duration: Duration = drl_core::time::parse_duration(&args.duration)
        .map_err(|e| CliError::Usage(format!("--duration: {e}")))?
        .into();
    let rate = match args.rate {
        Some(r) if r > 0.0 && r.is_finite() => Some(r),
        Some(r) => return Err(CliError::Usage(format!("--rate must be positive, got {r}"))),
        None => None,
    };
    let timeout: Duration = drl_core::time::parse_duration(&args.timeout)
        .map_err(|e| CliError::Usage(format!("--timeout: {e}")))?
        .into();
    if timeout.is_zero() {
        return Err(CliError::Usage("--timeout must be above 0".into()));
    }
    let progress_every: Duration = drl_core::time::parse_duration(&args.progress)
        .map_err(|e| CliError::Usage(format!("--progress: {e}")))?
        .into();
    if args.resp {
        return super::load_resp::resp_load(args, duration, rate, timeout, progress_every).await;
    }
    let hosts = args
        .node
        .iter()
        .map(|n| authority(n))
        .collect::<Result<Vec<_>, _>>()?;
    // The fixed part of every body: extra fields and the cost.
    let mut tail = String::new();
    for (name, value) in parse_fields(&args.fields)? {
        tail.push_str(&format!(",{}:{}", json_string(&name), json_string(&value)));
    }
    tail.push_str(&format!(",\"cost\":{}}}", args.cost));
    let user_key = json_string(&args.user_field);

    // Connect everything first, so that the clock starts with a warm pool.
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let host = &hosts[i % hosts.len()];
        conns.push(Connection::open_from(host, source_of(args, i)).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + duration;
    let turns = Pacer::start(rate, conns.len(), start, deadline)?;
    let progress = Arc::new(Progress::default());
    if !progress_every.is_zero() {
        tokio::spawn(
            progress
                .clone()
                .print_every(progress_every, start, stop.clone()),
        );
    }
    let mut tasks = Vec::with_capacity(conns.len());
    for ((i, mut conn), mut turn) in conns.into_iter().enumerate().zip(turns) {
        let host = conn.host().to_owned();
        let source = source_of(args, i);
        let honor_retry_after = args.honor_retry_after;
        let tail = tail.clone();
        let user_key = user_key.clone();
        let keys = args.keys;
        let stop = stop.clone();
        let progress = progress.clone();
        let mut rng = SplitMix(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut body = String::with_capacity(128);
            let mut last_answer = start;
            while !stop.load(Ordering::Relaxed) {
                let Some(scheduled) = turn.next(last_answer).await else {
                    break;
                };
                if scheduled >= deadline {
                    break;
                }
                body.clear();
                body.push('{');
                body.push_str(&user_key);
                body.push_str(":\"user-");
                body.push_str(&(rng.next() % keys).to_string());
                body.push('"');
                body.push_str(&tail);
                let request = axum::http::Request::post("/v1/check")
                    .header("host", host.as_str())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(axum::body::Bytes::from(
                        body.clone(),
                    )));
                let Ok(request) = request else {
                    report.error("request could not be built");
                    break;
                };
                let failure = match tokio::time::timeout(timeout, conn.send(request)).await {
                    Ok(Ok((status, body, retry_after))) => {
                        last_answer = Instant::now();
                        let took = last_answer.duration_since(scheduled);
                        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                        match status {
                            200 => {
                                report.allowed += 1;
                                report.latency.record(took);
                                progress.allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            429 => {
                                report.denied += 1;
                                report.latency.record(took);
                                progress.denied.fetch_add(1, Ordering::Relaxed);
                            }
                            503 if retry_after.is_some() => {
                                report.shed += 1;
                                report.shed_latency.record(took);
                                progress.shed.fetch_add(1, Ordering::Relaxed);
                                if honor_retry_after {
                                    let wait = jittered(retry_after.unwrap_or(1), &mut rng);
                                    let left = deadline.saturating_duration_since(Instant::now());
                                    tokio::time::sleep(wait.min(left)).await;
                                    last_answer = Instant::now();
                                }
                            }
                            _ => {
                                report.error(&refusal_reason(status, body.as_deref()));
                                progress.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None
                    }
                    Ok(Err(e)) => Some(format!("connection: {e}")),
                    Err(_) => Some(format!("timeout: no answer within {timeout:?}")),
                };
                if let Some(reason) = failure {
                    report.error(&reason);
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    last_answer = Instant::now();
                    // A broken or stuck connection: open a new one, or give up.
                    match tokio::time::timeout(timeout, Connection::open_from(&host, source)).await
                    {
                        Ok(Ok(c)) => conn = c,
                        _ => break,
                    }
                }
            }
            report
        }));
    }
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = LoadReport::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.merge(&r);
        }
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// The schedule of a paced run (`--rate`): request `j` (counted over all
/// connections) is due at `start + j / rate` and goes to connection
/// `j mod connections`. One OS thread keeps the schedule, sleeping with a
/// timer slack of 1 ns (Linux), and releases each connection's turns as
/// they fall due, at most [`Pacer::TICK`] late; tokio's 1 ms timers would
/// release a millisecond's requests at once.
pub(super) struct Pacer;

/// One connection's turns.
pub(super) struct Turns {
    /// `None`: closed loop, every turn is now.
    paced: Option<PacedTurns>,
}

struct PacedTurns {
    shared: Arc<TurnCounter>,
    /// This connection's index, the number of connections, the start and
    /// the schedule's step: turn `k` is due at `start + (index + k · n) · step`.
    index: u64,
    connections: u64,
    start: Instant,
    step_ns: f64,
    /// Turns taken so far.
    taken: u64,
}

#[derive(Default)]
struct TurnCounter {
    released: AtomicU64,
    done: AtomicBool,
    wake: Notify,
}

impl Pacer {
    /// The shortest sleep of the pacing thread: the most a turn is released
    /// late by design (a late release is measured from the actual send).
    const TICK: Duration = Duration::from_micros(200);

    /// One [`Turns`] per connection; for a paced run, starts the thread.
    pub(super) fn start(
        rate: Option<f64>,
        connections: usize,
        start: Instant,
        deadline: Instant,
    ) -> Result<Vec<Turns>, CliError> {
        let Some(rate) = rate else {
            return Ok((0..connections).map(|_| Turns { paced: None }).collect());
        };
        let step_ns = 1e9 / rate;
        let counters: Vec<Arc<TurnCounter>> = (0..connections)
            .map(|_| Arc::new(TurnCounter::default()))
            .collect();
        let turns = counters
            .iter()
            .enumerate()
            .map(|(i, shared)| Turns {
                paced: Some(PacedTurns {
                    shared: shared.clone(),
                    index: i as u64,
                    connections: connections as u64,
                    start,
                    step_ns,
                    taken: 0,
                }),
            })
            .collect();
        std::thread::Builder::new()
            .name("drl-load-pacer".into())
            .spawn(move || Self::run(&counters, start, deadline, step_ns))?;
        Ok(turns)
    }

    fn run(counters: &[Arc<TurnCounter>], start: Instant, deadline: Instant, step_ns: f64) {
        #[cfg(target_os = "linux")]
        // SAFETY: prctl(PR_SET_TIMERSLACK) changes only this thread's timer
        // slack; it takes no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let n = counters.len() as u64;
        let due = |j: u64| start + Duration::from_nanos((j as f64 * step_ns) as u64);
        let mut j: u64 = 0;
        loop {
            // Release every turn due by now, then sleep until the next one,
            // but for at least a tick: above 1 / TICK requests a second the
            // thread wakes once per tick, not once per request, which keeps
            // its own CPU (and the connections' wake-ups) from competing
            // with the server on a small machine.
            let now = Instant::now();
            while due(j) <= now && due(j) < deadline {
                let c = &counters[(j % n) as usize];
                c.released.fetch_add(1, Ordering::Release);
                c.wake.notify_one();
                j += 1;
            }
            if due(j) >= deadline {
                break;
            }
            let wake = due(j).max(now + Self::TICK);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        for c in counters {
            c.done.store(true, Ordering::Release);
            c.wake.notify_one();
        }
    }
}

impl Turns {
    /// When the next request counts from, once it is this connection's
    /// turn: the scheduled time if the connection was still waiting for the
    /// previous answer then (the server's delay), else now (a late wake-up
    /// is the generator's delay). `None` once the schedule has ended.
    pub(super) async fn next(&mut self, last_answer: Instant) -> Option<Instant> {
        let Some(p) = self.paced.as_mut() else {
            return Some(Instant::now());
        };
        while p.shared.released.load(Ordering::Acquire) <= p.taken {
            if p.shared.done.load(Ordering::Acquire) {
                return None;
            }
            p.shared.wake.notified().await;
        }
        let j = p.index + p.taken * p.connections;
        p.taken += 1;
        let at = p.start + Duration::from_nanos((j as f64 * p.step_ns) as u64);
        Some(if last_answer > at { at } else { Instant::now() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_turns_follow_the_schedule_round_robin_and_end_at_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // 2,000/s over 3 connections for 60 ms: 120 turns, 40 each.
            let start = Instant::now();
            let deadline = start + Duration::from_millis(60);
            let turns = Pacer::start(Some(2_000.0), 3, start, deadline).unwrap();
            let mut tasks = Vec::new();
            for (i, mut t) in turns.into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let mut times = Vec::new();
                    // Always "still waiting for the previous answer": the
                    // scheduled times themselves come back.
                    while let Some(at) = t.next(deadline + Duration::from_secs(1)).await {
                        times.push(at);
                    }
                    (i, times)
                }));
            }
            for task in tasks {
                let (i, times) = task.await.unwrap();
                assert_eq!(times.len(), 40, "connection {i}");
                for (k, at) in times.iter().enumerate() {
                    // Turn k of connection i is request i + 3k, at 0.5 ms steps.
                    let want = Duration::from_micros(500 * (i as u64 + 3 * k as u64));
                    assert_eq!(at.duration_since(start), want);
                }
            }
            // A request that went out when its turn came is measured from then.
            let mut one = Pacer::start(
                Some(1_000.0),
                1,
                Instant::now(),
                Instant::now() + Duration::from_millis(5),
            )
            .unwrap()
            .pop()
            .unwrap();
            let before = Instant::now();
            let at = one.next(before - Duration::from_secs(1)).await.unwrap();
            assert!(at >= before);
        });
        // Closed loop: every turn is now, and there is no end.
        let mut closed = Pacer::start(None, 1, Instant::now(), Instant::now())
            .unwrap()
            .pop()
            .unwrap();
        let t = rt.block_on(closed.next(Instant::now()));
        assert!(t.is_some());
    }

    #[test]
    fn draws_are_seeded() {
        let a: Vec<u64> = {
            let mut r = SplitMix(7);
            (0..4).map(|_| r.next()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SplitMix(7);
            (0..4).map(|_| r.next()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
