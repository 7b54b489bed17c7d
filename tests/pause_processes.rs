//! A paused node costs the others almost nothing, on real processes (`drl
//! cluster`, three nodes): one key is offered at 80% of its limit through
//! nodes 0 and 2 while node 1 is stopped with SIGSTOP for 3 s. The live
//! nodes fence the silent one after 60 ms instead of waiting for the
//! failure detector (seconds), so the key keeps being admitted. The full
//! measurement, with a 10 s pause and two limits, is `scripts/pause.sh`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::cluster::LocalCluster;
use support::{request, signal, Resume};

const RULES: &str = r#"
[[rules]]
name = "pause-probe"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 100, window = "1s" } ]
"#;

/// One answer: when the request left, when its answer came, its status.
type Answer = (Instant, Instant, u16);

/// Offers `user`'s key through `port` at `per_sec` from `start` until `end`.
fn offer(port: u16, per_sec: f64, start: Instant, end: Instant, log: Arc<Mutex<Vec<Answer>>>) {
    let every = Duration::from_secs_f64(1.0 / per_sec);
    let mut at = start;
    while at < end {
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = Instant::now();
        let code = request(port, "POST", "/v1/check", r#"{"user":"paused"}"#).map_or(0, |r| r.0);
        log.lock().unwrap().push((sent, Instant::now(), code));
        at += every;
    }
}

#[test]
fn a_stopped_node_does_not_stall_a_key_near_its_limit() {
    // The default fence (`fence_after` 60 ms, corroborated by a majority).
    let c = LocalCluster::start("pause");
    c.put_rules(RULES, "pause-probe");
    let log = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now() + Duration::from_millis(100);
    let (stop_at, pause) = (start + Duration::from_secs(1), Duration::from_secs(3));
    let end = stop_at + pause;
    // 80 requests a second in all: 80% of the limit always fits.
    let loops: Vec<_> = [c.http, c.http + 2]
        .into_iter()
        .map(|port| {
            let log = log.clone();
            std::thread::spawn(move || offer(port, 40.0, start, end, log))
        })
        .collect();
    let node1 = c.node_pid(1);
    std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
    signal(node1, "-STOP");
    let resume = Resume(node1);
    let stopped = Instant::now();
    for l in loops {
        l.join().unwrap();
    }
    drop(resume);
    let log = log.lock().unwrap();
    let during: Vec<&Answer> = log.iter().filter(|a| a.0 >= stopped).collect();
    let refused = during.iter().filter(|a| a.2 == 429).count();
    let errors = during.iter().filter(|a| a.2 != 200 && a.2 != 429).count();
    let mut admitted: Vec<Instant> = during.iter().filter(|a| a.2 == 200).map(|a| a.1).collect();
    admitted.sort();
    let marks: Vec<Instant> = std::iter::once(stopped)
        .chain(admitted)
        .chain(std::iter::once(end))
        .collect();
    let gap = marks
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let summary = format!(
        "{} offered during the pause, {refused} refused, {errors} errors, longest gap {gap:?}",
        during.len()
    );
    println!("{summary}");
    assert_eq!(errors, 0, "{summary}");
    // Waiting for the failure detector stalled the key for seconds with
    // over a hundred refusals; the fence (60 ms) costs a few requests. The
    // bounds leave room for a loaded machine.
    assert!(gap < Duration::from_millis(600), "{summary}");
    assert!(refused <= 12, "{summary}");
}
