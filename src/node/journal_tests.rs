use super::*;
use drl_core::descriptor::Descriptors;
use drl_core::key::KeySeed;
use drl_core::limiter::LimiterConfig;
use drl_core::rules::RuleSet;
use drl_core::share::ShareView;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 1000, window = "1h" } ]
"#;

fn limiter() -> Arc<Limiter> {
    let config = LimiterConfig {
        own_slot: NodeSlot::new(1),
        slots: 3,
        ..LimiterConfig::default()
    };
    let l = Limiter::new(RuleSet::from_toml(RULES).unwrap(), config)
        .and_then(|l| l.clustered(ShareView::alone(1)))
        .unwrap();
    l.set_admitting(true);
    Arc::new(l)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drl-journal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spend(l: &Limiter, user: &str, n: u32) {
    let f = [("user", user)];
    let d = Descriptors::new(&f).unwrap();
    for _ in 0..n {
        assert!(l.check(&d, 1).unwrap().is_allowed());
    }
}

fn remaining(l: &Limiter, user: &str) -> u64 {
    let f = [("user", user)];
    l.check(&Descriptors::new(&f).unwrap(), 0)
        .unwrap()
        .quota
        .unwrap()
        .remaining
}

/// What the node's task does every sync interval: a shipping round, then
/// the seal between rounds.
fn round(l: &Limiter) {
    let now = l.clock().now();
    for k in l.drain_changed() {
        l.take_shipment(now, k, NodeSlot::new(1));
    }
    shipped_keys(l).unwrap().seal();
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn durability_settings_parse() {
    let s = Nanos::from_secs(1);
    assert_eq!(Durability::parse("none", s), Ok(Durability::None));
    assert_eq!(Durability::parse("sync", s), Ok(Durability::Sync));
    assert_eq!(
        Durability::parse("interval", Nanos::from_millis(200)),
        Ok(Durability::Interval(Nanos::from_millis(200)))
    );
    assert!(Durability::parse("interval", Nanos::from_secs(61)).is_err());
    assert!(Durability::parse("always", s).is_err());
}

#[test]
fn what_the_writer_wrote_comes_back_and_checkpoints_cut_it() {
    let dir = scratch("files");
    let snapshot = dir.join("node-1.snapshot");
    let a = limiter();
    let stats = Arc::new(JournalStats::new(Durability::Sync));
    let journal = Journal::start(
        a.clone(),
        FileSegments::new(&snapshot, KeySeed::default(), 0),
        stats.clone(),
    )
    .unwrap();
    spend(&a, "alice", 40);
    round(&a);
    spend(&a, "bob", 3);
    round(&a);
    wait_until("two groups written", || stats.groups() >= 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A checkpoint: everything after the rotation is in the new segment.
    let seq = rt.block_on(journal.rotate()).unwrap();
    assert_eq!(seq, 1);
    spend(&a, "alice", 2);
    round(&a);
    wait_until("the third group", || {
        stats.bytes() > 0 && stats.groups() >= 2
    });
    journal.stop();
    let b = limiter();
    let r = recover(&b, &snapshot, b.clock().now());
    assert_eq!(
        (r.segments, r.tail_cuts, r.refused, r.next_seq),
        (2, 0, 0, 2)
    );
    assert_eq!(remaining(&b, "alice"), 958);
    assert_eq!(remaining(&b, "bob"), 997);
    // Once a snapshot covers segment 0 it goes; segment 1 stays.
    let mut files = FileSegments::new(&snapshot, KeySeed::default(), 2);
    files.remove_before(seq).unwrap();
    let c = limiter();
    let r = recover(&c, &snapshot, c.clock().now());
    assert_eq!(r.segments, 1);
    assert_eq!(
        remaining(&c, "alice"),
        958,
        "the later group holds the values"
    );
    assert_eq!(remaining(&c, "bob"), 1000, "bob was only in segment 0");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_torn_tail_is_cut_and_counted() {
    let dir = scratch("torn");
    let snapshot = dir.join("node-1.snapshot");
    let a = limiter();
    let stats = Arc::new(JournalStats::new(Durability::Sync));
    let journal = Journal::start(
        a.clone(),
        FileSegments::new(&snapshot, KeySeed::default(), 0),
        stats.clone(),
    )
    .unwrap();
    spend(&a, "carol", 5);
    round(&a);
    wait_until("a group", || stats.groups() >= 1);
    journal.stop();
    let path = dir.join("node-1.snapshot.journal-0000000000");
    let good = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of the next record.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let b = limiter();
    let r = recover(&b, &snapshot, b.clock().now());
    assert_eq!(r.tail_cuts, 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "cut back");
    assert_eq!(remaining(&b, "carol"), 995);
    // Cut once: the next start reads it whole.
    let c = limiter();
    assert_eq!(recover(&c, &snapshot, c.clock().now()).tail_cuts, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files that fail or slow down on demand.
struct Faulty {
    inner: FileSegments,
    faults: Arc<Mutex<(bool, Duration)>>,
}

impl Segments for Faulty {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.faults.lock().unwrap().0 {
            // Half the group reaches the file, as on a disk that fills up.
            let _ = self.inner.append(&bytes[..bytes.len() / 2]);
            return Err(io::Error::from_raw_os_error(28));
        }
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        let delay = self.faults.lock().unwrap().1;
        std::thread::sleep(delay);
        self.inner.sync()
    }
    fn abandon(&mut self) {
        self.inner.abandon()
    }
    fn rotate(&mut self) -> io::Result<u64> {
        self.inner.rotate()
    }
    fn remove_before(&mut self, seq: u64) -> io::Result<()> {
        self.inner.remove_before(seq)
    }
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }
}

#[test]
fn a_full_disk_degrades_durability_not_decisions_and_nothing_is_lost_after() {
    let dir = scratch("full");
    let snapshot = dir.join("node-1.snapshot");
    let a = limiter();
    let faults = Arc::new(Mutex::new((true, Duration::ZERO)));
    let stats = Arc::new(JournalStats::new(Durability::Interval(Nanos::from_millis(
        20,
    ))));
    let journal = Journal::start(
        a.clone(),
        Faulty {
            inner: FileSegments::new(&snapshot, KeySeed::default(), 0),
            faults: faults.clone(),
        },
        stats.clone(),
    )
    .unwrap();
    spend(&a, "dave", 10);
    round(&a);
    wait_until("degraded", || stats.degraded().is_some());
    assert!(stats.degraded().unwrap().contains("write failed"));
    assert!(stats.write_errors() > 0);
    // Decisions go on.
    spend(&a, "dave", 10);
    round(&a);
    // The disk has room again: the values held back are written.
    faults.lock().unwrap().0 = false;
    // A slow fsync on a loaded machine may still be reported beside it:
    // what must clear is the write error.
    wait_until("healthy again", || !stats.has_error());
    assert!(stats
        .degraded()
        .is_none_or(|d| d.starts_with("journal fsync slow")));
    journal.stop();
    let b = limiter();
    let r = recover(&b, &snapshot, b.clock().now());
    assert!(r.tail_cuts >= 1, "the half-written group is cut: {r:?}");
    assert_eq!(remaining(&b, "dave"), 980);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_fsync_is_reported_while_it_lasts_and_after() {
    let dir = scratch("slow");
    let snapshot = dir.join("node-1.snapshot");
    let a = limiter();
    let faults = Arc::new(Mutex::new((false, Duration::from_millis(500))));
    let stats = Arc::new(JournalStats::new(Durability::Sync));
    let journal = Journal::start(
        a.clone(),
        Faulty {
            inner: FileSegments::new(&snapshot, KeySeed::default(), 0),
            faults: faults.clone(),
        },
        stats.clone(),
    )
    .unwrap();
    spend(&a, "erin", 1);
    round(&a);
    wait_until("slow fsync seen", || {
        stats.degraded().is_some_and(|d| d.contains("slow"))
    });
    // Decisions never wait for it.
    let start = Instant::now();
    spend(&a, "erin", 100);
    assert!(start.elapsed() < Duration::from_millis(400));
    faults.lock().unwrap().1 = Duration::ZERO;
    spend(&a, "erin", 1);
    round(&a);
    wait_until("fast again", || stats.degraded().is_none());
    let (_, count, buckets) = stats.fsync_histogram();
    assert!(count >= 2);
    assert!(buckets.iter().any(|&(le, n)| le == 1.0 && n >= 1));
    journal.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_fsync_stops_being_reported_ten_seconds_after_it_ended_when_no_other_follows() {
    let mut stats = JournalStats::new(Durability::Interval(Nanos::from_secs(1)));
    stats.epoch = Instant::now()
        .checked_sub(Duration::from_secs(30))
        .expect("the machine has been up for 30 s");
    stats.observe_fsync(Duration::from_millis(300));
    assert!(stats.degraded().is_some_and(|d| d.contains("slow: 300 ms")));
    // The same fsync, had it ended 30 s ago (an idle node writes nothing).
    stats.last_fsync_end.store(0, Ordering::Relaxed);
    assert_eq!(stats.degraded(), None);
    // A fast one replaces a slow one at once.
    stats.observe_fsync(Duration::from_millis(300));
    stats.observe_fsync(Duration::from_millis(2));
    assert_eq!(stats.degraded(), None);
}
