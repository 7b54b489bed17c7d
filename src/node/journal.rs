//! The write-ahead journal's I/O: a writer thread that appends this node's
//! changed slot values in groups, fsyncs them by the durability policy, and
//! cuts the journal at each snapshot (a checkpoint); and the replay of what
//! it left at start.
//!
//! The decision path never waits on the journal's disk and makes no system
//! call for it: the replicator already takes every changed key once per
//! shipping round ([`ShippedKeys`]), and the writer reads those keys' values
//! again when it writes them, once per group. Under `sync` an answer that
//! counted hits waits for its group's fsync ([`SyncCommit`]); under
//! `interval` and `none` nothing waits.
//!
//! A failing disk (full, read-only, an fsync that errors or takes longer
//! than [`SLOW_FSYNC`]) never stops decisions: the writer keeps the keys it
//! could not write for its next attempt, abandons the segment a failed
//! write may have torn (its good part stays readable), reports degraded
//! durability (`/readyz`, `drl_durability_degraded`), and releases `sync`
//! answers rather than hold them.
//!
//! [`ShippedKeys`]: drl_core::limiter::ShippedKeys

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};

use drl_core::cluster::store::{shipped_keys, ReplicaStore};
use drl_core::cluster::wal;
use drl_core::decide::{Commit, CommitFuture};
use drl_core::key::CounterKey;
use drl_core::limiter::Limiter;
use drl_core::slot::NodeSlot;
use drl_core::time::{Clock, Nanos};

pub(crate) use super::journal_files::{recover, FileSegments, Recovered};

/// What the journal keeps on disk, and what a crash of every node at once
/// can cost (see DESIGN.md, "Durability").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// No journal: counts reach disk with the snapshot only.
    None,
    /// Groups are written every 10 ms and fsynced every interval.
    Interval(Nanos),
    /// An answer that counted hits waits for its group's fsync.
    Sync,
}

/// How often `interval` writes a group (without fsync): what a crash of
/// the process alone, its kernel surviving, can lose.
pub(crate) const WRITE_PERIOD: Duration = Duration::from_millis(10);
/// How often `sync` looks for groups to commit.
const SYNC_PERIOD: Duration = Duration::from_millis(1);
/// An fsync slower than this marks durability degraded.
pub(crate) const SLOW_FSYNC: Duration = Duration::from_millis(200);
/// How long a slow fsync stays reported when no other follows it (an idle
/// node fsyncs only when it has something to write).
const SLOW_SHOWN: Duration = Duration::from_secs(10);
/// How often a failing disk is tried again.
const RETRY_PERIOD: Duration = Duration::from_secs(1);
/// The longest a `sync` answer waits for its commit (a writer stuck on a
/// dead disk must not hold decisions).
const COMMIT_PATIENCE: Duration = Duration::from_secs(2);

impl Durability {
    /// Parses the `durability` setting; `interval` is used by `interval`.
    pub fn parse(text: &str, interval: Nanos) -> Result<Self, String> {
        match text {
            "none" => Ok(Durability::None),
            "sync" => Ok(Durability::Sync),
            "interval" if interval >= Nanos::from_millis(1) && interval <= Nanos::from_secs(60) => {
                Ok(Durability::Interval(interval))
            }
            "interval" => Err("durability_interval must be between 1ms and 60s".into()),
            other => Err(format!("{other:?}: use none, interval or sync")),
        }
    }
    /// The policy's name, as configured.
    pub fn name(&self) -> &'static str {
        match self {
            Durability::None => "none",
            Durability::Interval(_) => "interval",
            Durability::Sync => "sync",
        }
    }
}

/// Upper bounds of the fsync duration buckets, in seconds.
const FSYNC_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What the journal reports to `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct JournalStats {
    /// The policy in force.
    pub policy: Durability,
    error: Mutex<Option<String>>,
    fsync_buckets: [AtomicU64; FSYNC_BOUNDS.len() + 1],
    fsync_sum_ns: AtomicU64,
    last_fsync_ns: AtomicU64,
    /// When the last fsync ended (ns since `epoch`).
    last_fsync_end: AtomicU64,
    /// When the fsync under way started (ns since `epoch`), 0 when none.
    fsync_started: AtomicU64,
    epoch: Instant,
    bytes: AtomicU64,
    groups: AtomicU64,
    write_errors: AtomicU64,
    tail_cuts: AtomicU64,
    segments_refused: AtomicU64,
}

impl JournalStats {
    /// Fresh statistics for `policy`.
    pub fn new(policy: Durability) -> Self {
        JournalStats {
            policy,
            error: Mutex::new(None),
            fsync_buckets: Default::default(),
            fsync_sum_ns: AtomicU64::new(0),
            last_fsync_ns: AtomicU64::new(0),
            last_fsync_end: AtomicU64::new(0),
            fsync_started: AtomicU64::new(0),
            epoch: Instant::now(),
            bytes: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            tail_cuts: AtomicU64::new(0),
            segments_refused: AtomicU64::new(0),
        }
    }
    /// Why durability is degraded now, if it is: the last write or fsync
    /// failed, or an fsync is taking longer than 200 ms, or one took that
    /// long in the last 10 s.
    pub fn degraded(&self) -> Option<String> {
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(e);
        }
        let slow = SLOW_FSYNC.as_nanos() as u64;
        let now = self.epoch.elapsed().as_nanos() as u64;
        let started = self.fsync_started.load(Ordering::Acquire);
        let running = if started == 0 {
            0
        } else {
            now.saturating_sub(started)
        };
        let ended = self.last_fsync_end.load(Ordering::Relaxed);
        let last = if now.saturating_sub(ended) < SLOW_SHOWN.as_nanos() as u64 {
            self.last_fsync_ns.load(Ordering::Relaxed)
        } else {
            0
        };
        (running > slow || last > slow)
            .then(|| format!("journal fsync slow: {} ms", running.max(last) / 1_000_000))
    }
    /// Bytes of journal segments on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Groups written.
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }
    /// Writes and fsyncs that failed.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
    /// Torn or corrupt segment tails cut at start.
    pub fn tail_cuts(&self) -> u64 {
        self.tail_cuts.load(Ordering::Relaxed)
    }
    /// Segments refused whole at start and moved aside.
    pub fn segments_refused(&self) -> u64 {
        self.segments_refused.load(Ordering::Relaxed)
    }
    /// The fsync histogram: `(sum in seconds, count, per-bucket counts)`.
    pub fn fsync_histogram(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let buckets = self
            .fsync_buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = b.load(Ordering::Relaxed);
                count += n;
                (FSYNC_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), n)
            })
            .collect();
        let sum = self.fsync_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
    pub(super) fn recovered(&self, r: &Recovered) {
        self.tail_cuts.store(r.tail_cuts, Ordering::Relaxed);
        self.segments_refused.store(r.refused, Ordering::Relaxed);
    }
    fn has_error(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
    fn observe_fsync(&self, took: Duration) {
        let ns = took.as_nanos() as u64;
        let i = FSYNC_BOUNDS.partition_point(|&b| b < took.as_secs_f64());
        self.fsync_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.fsync_sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.last_fsync_ns.store(ns, Ordering::Relaxed);
        self.last_fsync_end
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Where the writer puts its groups: numbered segment files on disk
/// ([`FileSegments`]), or a fault-injecting stand-in in tests.
pub(crate) trait Segments: Send + 'static {
    /// Appends `bytes` to the current segment (created, header first, if
    /// it does not exist yet).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes what was appended to the current segment durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Closes the current segment (after a failed write, which may have
    /// torn it): the next append starts a new one.
    fn abandon(&mut self);
    /// Starts a new segment and returns its number: every segment below it
    /// is complete.
    fn rotate(&mut self) -> io::Result<u64>;
    /// Deletes the segments numbered below `seq`.
    fn remove_before(&mut self, seq: u64) -> io::Result<()>;
    /// Bytes of all segments on disk.
    fn bytes(&self) -> u64;
}

enum Command {
    Rotate(oneshot::Sender<Option<u64>>),
    RemoveBefore(u64),
}

/// The driver's and the decision path's handle on the writer thread.
pub(crate) struct Journal {
    stats: Arc<JournalStats>,
    aborted: Arc<std::sync::atomic::AtomicBool>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    durable: watch::Receiver<u64>,
}

impl Journal {
    /// Starts the writer thread over `segments`; from now on the limiter's
    /// replicator keeps the keys it takes for it.
    pub(crate) fn start<S: Segments>(
        limiter: Arc<Limiter>,
        segments: S,
        stats: Arc<JournalStats>,
    ) -> io::Result<Journal> {
        let (durable_tx, durable) = watch::channel(0);
        let (commands, rx) = mpsc::channel();
        if let Some(tap) = shipped_keys(&limiter) {
            tap.keep();
        }
        let writer = Writer {
            own: limiter.config().own_slot,
            limiter,
            segments,
            stats: stats.clone(),
            durable: durable_tx,
            pending: HashSet::new(),
            written: HashSet::new(),
            retry_at: None,
            last_sync: Instant::now(),
        };
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abort = aborted.clone();
        let thread = std::thread::Builder::new()
            .name("drl-journal".into())
            .spawn(move || writer.run(rx, &abort))?;
        Ok(Journal {
            stats,
            aborted,
            commands: Mutex::new(Some(commands)),
            thread: Mutex::new(Some(thread)),
            durable,
        })
    }

    /// The journal's statistics.
    pub(crate) fn stats(&self) -> &Arc<JournalStats> {
        &self.stats
    }

    fn send(&self, c: Command) -> bool {
        let commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        commands.as_ref().is_some_and(|tx| tx.send(c).is_ok())
    }

    /// Starts a new segment before a snapshot is captured; the returned
    /// number goes to [`Journal::checkpointed`] once the snapshot is on
    /// disk. `None` if no new segment could be started (nothing may then be
    /// removed).
    pub(crate) async fn rotate(&self) -> Option<u64> {
        let (reply, answer) = oneshot::channel();
        if !self.send(Command::Rotate(reply)) {
            return None;
        }
        answer.await.ok().flatten()
    }

    /// A snapshot captured after segment `seq` was started is on disk: the
    /// segments before it are covered by it and removed.
    pub(crate) fn checkpointed(&self, seq: u64) {
        self.send(Command::RemoveBefore(seq));
    }

    /// Stops the writer at once, writing nothing more (a crash, in tests).
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// Writes and fsyncs what is pending, then stops the writer.
    pub(crate) fn stop(&self) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// A [`Commit`] for `sync` durability: `wake` asks the node's task to
    /// ship (and so hand the decision's key to the writer) at once.
    pub(crate) fn commit(&self, limiter: Arc<Limiter>, wake: Arc<Notify>) -> SyncCommit {
        SyncCommit {
            limiter,
            wake,
            durable: self.durable.clone(),
        }
    }
}

/// Holds an answer until the group holding its hits is fsynced (see the
/// module docs).
pub(crate) struct SyncCommit {
    limiter: Arc<Limiter>,
    wake: Arc<Notify>,
    durable: watch::Receiver<u64>,
}

impl Commit for SyncCommit {
    fn commit(&self) -> CommitFuture {
        // The hits are counted: the round after the one under way takes
        // them at the latest (see `ShippedKeys`).
        let target = shipped_keys(&self.limiter).map_or(0, |t| t.started()) + 1;
        self.wake.notify_one();
        let mut durable = self.durable.clone();
        Box::pin(async move {
            let _ = tokio::time::timeout(COMMIT_PATIENCE, durable.wait_for(|&d| d >= target)).await;
        })
    }
}

struct Writer<S> {
    limiter: Arc<Limiter>,
    own: NodeSlot,
    segments: S,
    stats: Arc<JournalStats>,
    durable: watch::Sender<u64>,
    /// Keys taken but not yet written (kept across a failed write).
    pending: HashSet<CounterKey>,
    /// Keys written since the last fsync (written again if it fails).
    written: HashSet<CounterKey>,
    last_sync: Instant,
    /// After a failure, when to try the disk again.
    retry_at: Option<Instant>,
}

impl<S: Segments> Writer<S> {
    fn run(mut self, commands: mpsc::Receiver<Command>, aborted: &std::sync::atomic::AtomicBool) {
        let period = match self.stats.policy {
            Durability::Sync => SYNC_PERIOD,
            _ => WRITE_PERIOD,
        };
        let mut next = Instant::now() + period;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::Rotate(reply)) => {
                    let _ = reply.send(self.rotate());
                    continue;
                }
                Ok(Command::RemoveBefore(seq)) => {
                    if let Err(e) = self.segments.remove_before(seq) {
                        tracing::warn!(error = %e, "old journal segments not removed");
                    }
                    self.stats
                        .bytes
                        .store(self.segments.bytes(), Ordering::Relaxed);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if !aborted.load(Ordering::SeqCst) {
                        self.cycle(true);
                    }
                    return;
                }
            }
            next = Instant::now() + period;
            self.cycle(false);
        }
    }

    /// One group: the keys taken since the last, their values now, one
    /// append, and an fsync when the policy (or `last`) asks for one.
    fn cycle(&mut self, last: bool) {
        let Some(tap) = shipped_keys(&self.limiter) else {
            return;
        };
        let (sealed, keys) = tap.drain();
        self.pending.extend(keys);
        let mut failed = None;
        let backing_off = self.retry_at.is_some_and(|t| Instant::now() < t && !last);
        if backing_off {
            // A failing disk is tried once per RETRY_PERIOD, not per group.
            self.release(sealed);
            return;
        }
        self.retry_at = None;
        if !self.pending.is_empty() {
            let now = self.limiter.clock().now();
            let values = self
                .pending
                .iter()
                .filter_map(|&k| Some((k, self.limiter.slot_values(now, k, self.own)?)));
            let mut bytes = Vec::new();
            wal::encode_values(&mut bytes, self.own, now, values);
            match self.segments.append(&bytes) {
                Ok(()) => {
                    self.written.extend(self.pending.drain());
                    self.stats.groups.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // The write may have torn the segment's tail: later
                    // groups go to a new one, so the torn record stays last.
                    self.segments.abandon();
                    failed = Some(format!("journal write failed: {e}"));
                }
            }
        }
        let due = match self.stats.policy {
            Durability::Sync => true,
            Durability::Interval(every) => self.last_sync.elapsed() >= Duration::from(every),
            Durability::None => false,
        };
        if failed.is_none() && !self.written.is_empty() && (due || last) {
            if let Err(e) = self.sync() {
                // What the failed fsync covered may never reach the disk:
                // write those keys' values again, into a new segment.
                self.pending.extend(self.written.drain());
                self.segments.abandon();
                failed = Some(format!("journal fsync failed: {e}"));
            }
        }
        self.stats
            .bytes
            .store(self.segments.bytes(), Ordering::Relaxed);
        match failed {
            Some(why) => {
                self.retry_at = Some(Instant::now() + RETRY_PERIOD);
                if self.stats.degraded().as_deref() != Some(why.as_str()) {
                    tracing::error!(reason = %why, "durability degraded; decisions go on");
                }
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.set_error(Some(why));
            }
            // Everything taken is written and fsynced again.
            None if self.pending.is_empty()
                && self.written.is_empty()
                && self.stats.has_error() =>
            {
                tracing::info!("journal writes and fsyncs again");
                self.stats.set_error(None);
            }
            None => {}
        }
        self.release(sealed);
    }

    /// Under `sync` the answers waiting for rounds up to `sealed` go now,
    /// written or not: a failed disk degrades durability, never decisions.
    fn release(&self, sealed: u64) {
        self.durable.send_if_modified(|d| {
            let moved = sealed > *d;
            *d = (*d).max(sealed);
            moved
        });
    }

    fn sync(&mut self) -> io::Result<()> {
        let start = Instant::now();
        self.stats.fsync_started.store(
            (self.stats.epoch.elapsed().as_nanos() as u64).max(1),
            Ordering::Release,
        );
        let result = self.segments.sync();
        self.stats.fsync_started.store(0, Ordering::Release);
        self.stats.observe_fsync(start.elapsed());
        self.last_sync = Instant::now();
        if result.is_ok() {
            self.written.clear();
        }
        result
    }

    fn rotate(&mut self) -> Option<u64> {
        if !self.written.is_empty() && self.sync().is_err() {
            self.pending.extend(self.written.drain());
            self.segments.abandon();
        }
        match self.segments.rotate() {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::warn!(error = %e, "journal segment not rotated");
                None
            }
        }
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
