//! Memory per tracked key: drl's limiter next to governor's keyed limiter.
//!
//! ```text
//! cargo run --release --example memory_per_key -- [--keys N] [--same-process]
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
//! * drl: one rule keyed by `user`, one one-second sliding window (two
//!   buckets), three node slots, keys inserted through `Limiter::check_at`.
//!   drl keeps a 64-bit digest of each key, never the name.
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

use drl::clock::SystemClock;
use drl::core::descriptor::Descriptors;
use drl::core::rules::RuleSet;
use drl::core::time::Clock as _;
use drl::limiter::{Limiter, LimiterConfig};
use governor::{Quota, RateLimiter};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 1000000, window = "1s" } ]
"#;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Drl,
    GovernorString,
    GovernorU64,
}

impl Subject {
    const ALL: [Subject; 3] = [Subject::Drl, Subject::GovernorString, Subject::GovernorU64];

    fn flag(self) -> &'static str {
        match self {
            Subject::Drl => "drl",
            Subject::GovernorString => "governor-string",
            Subject::GovernorU64 => "governor-u64",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Subject::Drl => "drl (3 slots, sliding window, check_at)",
            Subject::GovernorString => "governor dashmap, String keys",
            Subject::GovernorU64 => "governor dashmap, u64 keys",
        }
    }
    fn from_flag(s: &str) -> Option<Subject> {
        Subject::ALL.into_iter().find(|k| k.flag() == s)
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
    same_process: bool,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}\nusage: memory_per_key [--keys N] [--same-process]");
            return ExitCode::from(2);
        }
    };
    let page = page_size();
    if let Some(subject) = args.only {
        // Child mode: one measurement, one machine-readable line.
        let users = user_names(args.keys);
        let s = measure(subject, &users, page);
        println!(
            "SAMPLE {} {} {} {} {}",
            s.rss_before, s.rss_after, s.heap_before, s.heap_after, s.fill_secs
        );
        return ExitCode::SUCCESS;
    }

    let mut rows = Vec::new();
    if args.same_process {
        let users = user_names(args.keys);
        for subject in Subject::ALL {
            rows.push((subject, measure(subject, &users, page)));
        }
    } else {
        for subject in Subject::ALL {
            match measure_in_child(subject, args.keys) {
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
fn measure(subject: Subject, users: &[String], page: u64) -> Sample {
    let rss_before = rss(page);
    let heap_before = HEAP_LIVE.load(Ordering::Relaxed) as u64;
    let start = Instant::now();
    let keep: Box<dyn std::any::Any> = match subject {
        Subject::Drl => Box::new(fill_drl(users)),
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

fn fill_drl(users: &[String]) -> Limiter {
    let rules = RuleSet::from_toml(RULES).expect("example rules parse");
    let config = LimiterConfig {
        slots: 3,
        max_keys: users.len() + users.len() / 10 + 1,
        ..LimiterConfig::default()
    };
    let limiter = Limiter::new(rules, config).expect("example limiter builds");
    let now = SystemClock.now();
    for user in users {
        let fields = [("user", user.as_str())];
        let d = Descriptors::new(&fields).expect("valid user");
        assert!(limiter
            .check_at(now, &d, 1)
            .expect("no endpoint list")
            .is_allowed());
    }
    assert_eq!(limiter.keys_tracked(), users.len());
    limiter
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
}

fn measure_in_child(subject: Subject, keys: usize) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let out = Command::new(exe)
        .args(["--keys", &keys.to_string(), "--only", subject.flag()])
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
