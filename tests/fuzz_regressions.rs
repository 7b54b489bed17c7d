//! Replays every fuzz seed and every kept crash input (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz targets' own bodies, so
//! that a plain `cargo test` keeps fixed crashes fixed. The fuzzing itself
//! (`cargo fuzz`) runs in CI for a bounded time; see `fuzz/README.md`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("wire_frame", targets::wire_frame),
    ("replicator_frame", targets::replicator_frame),
    ("snapshot", targets::snapshot),
    ("check_body", targets::check_body),
    ("query", targets::query),
    ("refund_body", targets::refund_body),
    ("rules_file", targets::rules_file),
    ("resp_frame", targets::resp_frame),
];

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).expect("readable input");
            (e.path().display().to_string(), bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_and_kept_crash_input_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} has no seed inputs");
        for (path, bytes) in seeds
            .into_iter()
            .chain(inputs(&root.join("regressions").join(name)))
        {
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name} panicked on {path}");
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len());
}

/// The targets accept what the project itself produces: a real snapshot
/// and real frames pass their decoders (so the seeds exercise the deep
/// paths, not only the refusals).
#[test]
fn seeds_reach_past_the_decoders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (path, bytes) in inputs(&root.join("wire_frame")) {
        assert!(
            drl_core::wire::Frame::decode(&bytes).is_ok(),
            "{path} does not decode"
        );
    }
    let l = targets::limiter();
    for (path, bytes) in inputs(&root.join("snapshot")) {
        assert!(
            drl_core::cluster::snapshot::restore(&l, targets::NOW, &bytes).is_ok(),
            "{path} does not restore"
        );
    }
    for (path, bytes) in inputs(&root.join("rules_file")) {
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            drl_core::rules::RuleSet::from_toml(&text).is_ok(),
            "{path} does not parse"
        );
    }
}

/// Writes the snapshot seed anew from the current format
/// (`DRL_WRITE_SEEDS=1 cargo test --test fuzz_regressions`): three users'
/// counts captured from the fuzz targets' own limiter.
#[test]
fn the_snapshot_seed_is_written_by_the_current_format() {
    if std::env::var_os("DRL_WRITE_SEEDS").is_none() {
        return;
    }
    let l = targets::limiter();
    for user in ["ann", "bob", "cy"] {
        let fields = [("user", user), ("endpoint", "/b")];
        let d = drl_core::descriptor::Descriptors::new(&fields).unwrap();
        l.check_at(targets::NOW, &d, 1).unwrap();
    }
    let bytes = drl_core::cluster::snapshot::capture(&l, targets::NOW);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/snapshot/three-users");
    std::fs::write(path, bytes).unwrap();
}
