//! Memory per tracked key: drl's limiter next to governor's keyed limiter
//! (and, with `scripts/redis-memory.sh`, Redis).
//!
//! ```text
//! cargo run --release -p drl-core --example memory_per_key -- [--keys N] [--same-process] [--only SUBJECT]
//! ```
//!
//! Each limiter is measured by resident memory (`/proc/self/statm`, resident
//! pages × page size) just before it is built and after `N` distinct users
//! have made one request each; the growth over `N` is its cost per key,
//! construction included. The user names are built before the baseline, so
//! they are not counted against anyone. Alongside RSS, a counting allocator
//! gives the heap bytes the limiter holds (requested sizes: no allocator
//! overhead, no fragmentation).
//!
//! By default every limiter is measured in a fresh child process (this
//! example re-run with `--only`). Measured one after another in one process,
//! a limiter reuses the memory its predecessor freed, which the allocator
//! keeps resident, and its RSS barely grows: `--same-process` shows that
//! (each limiter from its own baseline, the previous one dropped first).
//!
//! drl subjects are `drl-<rule>-<nodes>-<load>`: one rule keyed by `user`,
//! a cluster of `<nodes>` slots, keys inserted through `Limiter::check_at`
//! on this node, and what the other nodes did merged into every key as
//! their deltas would be (`Ring::merge`, the path replication takes):
//!
//! * rules: `s1p10` a one-second sliding window of precision 10 (11
//!   buckets); `h1p60` a one-hour sliding window of precision 60 (61
//!   buckets, the sample rules' per-user limit); `gcra` 100 per second,
//!   burst 10 (the GCRA window: 17 buckets).
//! * loads: `one` one hit on this node; `burst` one hit from each of three
//!   nodes in the current bucket; `steady` hits from three nodes in every
//!   bucket of the window (the worst case for a key touched by three nodes).
//!
//! drl keeps a 64-bit digest of each key, never the name.
//!
//! * governor, `String` keys: `RateLimiter::dashmap`, the same `String`
//!   user names as drl; governor keeps a clone of every name.
//! * governor, `u64` keys: the user's number instead of the name: what
//!   governor costs when the caller has already reduced keys to integers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::num::NonZeroU32;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use drl_core::clock::SystemClock;
use drl_core::descriptor::Descriptors;
use drl_core::limiter::{Limiter, LimiterConfig};
use drl_core::rules::RuleSet;
use drl_core::slot::{NodeSlot, PnSlot};
use drl_core::time::Clock as _;
use drl_core::window::Ring;
use governor::{Quota, RateLimiter};

/// The rules the drl subjects use, by name.
fn rules(name: &str) -> Option<&'static str> {
    Some(match name {
        "s1p10" => {
            r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000, window = "1s", precision = 10 } ]
"#
        }
        "h1p60" => {
            r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000, window = "1h", precision = 60 } ]
"#
        }
        "gcra" => {
            r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "gcra", limit = 100, per = "1s", burst = 10 } ]
"#
        }
        _ => return None,
    })
}

const DEFAULT_KEYS: usize = 1_000_000;

/// Counts the bytes the program holds on the heap.
struct CountingAlloc;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            HEAP_LIVE.fetch_add(new_size, Ordering::Relaxed);
            HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// What is measured: governor with either key type, or drl with a rule,
/// a cluster size and a load.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Subject {
    Drl {
        rule: String,
        nodes: usize,
        load: Load,
    },
    GovernorString,
    GovernorU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    One,
    Burst,
    Steady,
}

impl Subject {
    /// The subjects measured by default.
    fn all() -> Vec<Subject> {
        let mut all = Vec::new();
        for (rule, nodes) in [
            ("s1p10", 3),
            ("h1p60", 3),
            ("h1p60", 50),
            ("gcra", 3),
            ("gcra", 50),
        ] {
            for load in [Load::One, Load::Burst, Load::Steady] {
                all.push(Subject::Drl {
                    rule: rule.into(),
                    nodes,
                    load,
                });
            }
        }
        all.push(Subject::GovernorString);
        all.push(Subject::GovernorU64);
        all
    }

    fn flag(&self) -> String {
        match self {
            Subject::Drl { rule, nodes, load } => {
                let load = match load {
                    Load::One => "one",
                    Load::Burst => "burst",
                    Load::Steady => "steady",
                };
                format!("drl-{rule}-{nodes}-{load}")
            }
            Subject::GovernorString => "governor-string".into(),
            Subject::GovernorU64 => "governor-u64".into(),
        }
    }
    fn title(&self) -> String {
        match self {
            Subject::Drl { .. } => self.flag(),
            Subject::GovernorString => "governor dashmap, String keys".into(),
            Subject::GovernorU64 => "governor dashmap, u64 keys".into(),
        }
    }
    fn from_flag(s: &str) -> Option<Subject> {
        match s {
            "governor-string" => return Some(Subject::GovernorString),
            "governor-u64" => return Some(Subject::GovernorU64),
            _ => {}
        }
        let mut parts = s.strip_prefix("drl-")?.split('-');
        let rule = parts.next()?;
        rules(rule)?;
        let nodes: usize = parts.next()?.parse().ok()?;
        if !(3..=64).contains(&nodes) {
            return None;
        }
        let load = match parts.next()? {
            "one" => Load::One,
            "burst" => Load::Burst,
            "steady" => Load::Steady,
            _ => return None,
        };
        parts.next().is_none().then(|| Subject::Drl {
            rule: rule.into(),
            nodes,
            load,
        })
    }
}

/// What one measurement saw, in bytes and seconds.
struct Sample {
    rss_before: u64,
    rss_after: u64,
    heap_before: u64,
    heap_after: u64,
    fill_secs: f64,
}

struct Args {
    keys: usize,
    only: Option<Subject>,
    /// With `--subjects a,b,…`: measure only these (each in a child).
    subjects: Option<Vec<Subject>>,
    same_process: bool,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!(
                "{msg}\nusage: memory_per_key [--keys N] [--same-process] [--subjects a,b,...]"
            );
            return ExitCode::from(2);
        }
    };
    let page = page_size();
    if let Some(subject) = args.only {
        // Child mode: one measurement, one machine-readable line.
        let users = user_names(args.keys);
        let s = measure(&subject, &users, page);
        println!(
            "SAMPLE {} {} {} {} {}",
            s.rss_before, s.rss_after, s.heap_before, s.heap_after, s.fill_secs
        );
        return ExitCode::SUCCESS;
    }

    let mut rows = Vec::new();
    if args.same_process {
        let users = user_names(args.keys);
        for subject in Subject::all() {
            let sample = measure(&subject, &users, page);
            rows.push((subject, sample));
        }
    } else {
        for subject in args.subjects.clone().unwrap_or_else(Subject::all) {
            match measure_in_child(&subject, args.keys) {
                Ok(s) => rows.push((subject, s)),
                Err(e) => {
                    eprintln!("{}: {e}", subject.flag());
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    let how = if args.same_process {
        "one process, one after another"
    } else {
        "each in its own process"
    };
    println!("{} keys, page size {page} B, {how}\n", args.keys);
    println!("| limiter | RSS before (MiB) | RSS after (MiB) | RSS bytes per key | heap bytes per key | fill (ns per key) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let n = args.keys as f64;
    for (subject, s) in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            subject.title(),
            mib(s.rss_before),
            mib(s.rss_after),
            s.rss_after.saturating_sub(s.rss_before) as f64 / n,
            s.heap_after.saturating_sub(s.heap_before) as f64 / n,
            s.fill_secs * 1e9 / n,
        );
    }
    ExitCode::SUCCESS
}

fn user_names(keys: usize) -> Vec<String> {
    (0..keys).map(|i| format!("user-{i:08}")).collect()
}

/// Builds and fills one limiter from a fresh baseline, then drops it.
fn measure(subject: &Subject, users: &[String], page: u64) -> Sample {
    let rss_before = rss(page);
    let heap_before = HEAP_LIVE.load(Ordering::Relaxed) as u64;
    let start = Instant::now();
    let keep: Box<dyn std::any::Any> = match subject {
        Subject::Drl { rule, nodes, load } => Box::new(fill_drl(users, rule, *nodes, *load)),
        Subject::GovernorString => {
            let limiter = RateLimiter::<String, _, _>::dashmap(quota());
            for user in users {
                assert!(limiter.check_key(user).is_ok());
            }
            assert_eq!(limiter.len(), users.len());
            Box::new(limiter)
        }
        Subject::GovernorU64 => {
            let limiter = RateLimiter::<u64, _, _>::dashmap(quota());
            for i in 0..users.len() as u64 {
                assert!(limiter.check_key(&i).is_ok());
            }
            assert_eq!(limiter.len(), users.len());
            Box::new(limiter)
        }
    };
    let fill_secs = start.elapsed().as_secs_f64();
    let sample = Sample {
        rss_before,
        rss_after: rss(page),
        heap_before,
        heap_after: HEAP_LIVE.load(Ordering::Relaxed) as u64,
        fill_secs,
    };
    drop(keep);
    sample
}

fn fill_drl(users: &[String], rule: &str, nodes: usize, load: Load) -> Limiter {
    let rules = RuleSet::from_toml(rules(rule).expect("known rule")).expect("example rules parse");
    let config = LimiterConfig {
        slots: nodes,
        max_keys: users.len() + users.len() / 10 + 1,
        ..LimiterConfig::default()
    };
    let limiter = Limiter::new(rules, config).expect("example limiter builds");
    let now = SystemClock::raw().now();
    for user in users {
        let fields = [("user", user.as_str())];
        let d = Descriptors::new(&fields).expect("valid user");
        assert!(limiter
            .check_at(now, &d, 1)
            .expect("no endpoint list")
            .is_allowed());
    }
    assert_eq!(limiter.keys_tracked(), users.len());
    if load != Load::One {
        // Two more nodes (the last two slots: in a 50-node cluster a key is
        // touched by any three) and, when steady, every bucket.
        let table = limiter.table(0).expect("one limit");
        let spec = *table.spec();
        let now_epoch = spec.epoch(now);
        let epochs = match load {
            Load::Steady => (now_epoch + 1).saturating_sub(spec.buckets() as u64)..=now_epoch,
            _ => now_epoch..=now_epoch,
        };
        let peers = [
            NodeSlot::new(0),
            NodeSlot::new((nodes - 2) as u16),
            NodeSlot::new((nodes - 1) as u16),
        ];
        table.for_each(|entry| {
            for epoch in epochs.clone() {
                for (i, &slot) in peers.iter().enumerate() {
                    if i == 0 && epoch == now_epoch {
                        continue; // this node's own hit, counted by check_at
                    }
                    let value = PnSlot {
                        p: 1 + (epoch % 7) as u32,
                        n: 0,
                    };
                    Ring::merge(entry, &spec, now, 1, epoch, slot, value);
                }
            }
        });
    }
    limiter
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
}

fn measure_in_child(subject: &Subject, keys: usize) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let out = Command::new(exe)
        .args(["--keys", &keys.to_string(), "--only", &subject.flag()])
        .output()
        .map_err(|e| format!("cannot run the child: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("SAMPLE "))
        .ok_or_else(|| format!("child printed no sample: {text}"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let int = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad sample")
    };
    Ok(Sample {
        rss_before: int(0)?,
        rss_after: int(1)?,
        heap_before: int(2)?,
        heap_after: int(3)?,
        fill_secs: f.get(4).and_then(|v| v.parse().ok()).ok_or("bad sample")?,
    })
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        keys: DEFAULT_KEYS,
        only: None,
        subjects: None,
        same_process: false,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--same-process" => parsed.same_process = true,
            "--keys" => {
                let v = args.next().ok_or("--keys needs a value")?;
                parsed.keys = v
                    .replace('_', "")
                    .parse()
                    .map_err(|e| format!("--keys {v:?}: {e}"))?;
                if parsed.keys == 0 {
                    return Err("--keys must be at least 1".into());
                }
            }
            "--only" => {
                let v = args.next().ok_or("--only needs a value")?;
                parsed.only = Some(
                    Subject::from_flag(&v)
                        .ok_or_else(|| format!("--only {v:?}: unknown limiter"))?,
                );
            }
            "--subjects" => {
                let v = args.next().ok_or("--subjects needs a value")?;
                parsed.subjects = Some(
                    v.split(',')
                        .map(|f| {
                            Subject::from_flag(f).ok_or_else(|| format!("unknown limiter {f:?}"))
                        })
                        .collect::<Result<_, _>>()?,
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

/// Resident set size in bytes: the second field of `/proc/self/statm`.
fn rss(page: u64) -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").expect("this example needs Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm has a resident field");
    pages * page
}

/// The kernel page size, from the first mapping in `/proc/self/smaps`
/// (std has no `sysconf`); 4 KiB if that cannot be read.
fn page_size() -> u64 {
    fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|smaps| {
            smaps.lines().find_map(|l| {
                let kb = l
                    .strip_prefix("KernelPageSize:")?
                    .trim()
                    .strip_suffix("kB")?;
                kb.trim().parse::<u64>().ok()
            })
        })
        .map_or(4096, |kb| kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
