#!/usr/bin/env bash
# What a crash of every node at once costs, per durability policy, on real
# `drl node` processes (release build, three nodes over QUIC on loopback,
# each with a snapshot every 60 s and the journal policy under test):
#
#   keys with a 1-minute and a 1-hour limit are spent through all three
#   nodes for 2 s by a load generator; every node is killed with SIGKILL in
#   one `kill` call; the nodes start again and recover; each key's loss is
#   what its clients were told was admitted less what the cluster counts
#   after the restart (the extra admissions the key will get). `interval`
#   must lose at most what each key was admitted in its last second before
#   the crash, `sync` nothing. Then a rolling restart (each node stopped
#   cleanly and started again in turn, under load) must lose nothing.
#
# Usage:
#   scripts/crash-all.sh                 # interval and sync, 20 crashes each, 200 keys
#   scripts/crash-all.sh --short         # 3 crashes each
#   scripts/crash-all.sh sync none       # chosen policies (none: no journal)
# Environment: REPS (20; --short 3), KEYS (200), CARGO_TARGET_DIR.
#
# The measurement is the ignored `crash_all_measured` test of
# tests/durability_processes.rs, whose short form runs in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-20}
KEYS=${KEYS:-200}
POLICIES=()
for arg in "$@"; do
  case "$arg" in
    --short) REPS=${REPS_SHORT:-3} ;;
    none|interval|sync) POLICIES+=("$arg") ;;
    *) echo "usage: $0 [--short] [none|interval|sync ...]" >&2; exit 2 ;;
  esac
done
[ ${#POLICIES[@]} -gt 0 ] || POLICIES=(interval sync)

echo "== building (release)"
cargo test --release --test durability_processes --no-run

for policy in "${POLICIES[@]}"; do
  echo "== $policy: $REPS crashes of all 3 nodes, $KEYS keys"
  DRL_CRASH_POLICY=$policy DRL_CRASH_REPS=$REPS DRL_CRASH_KEYS=$KEYS \
    cargo test --release --test durability_processes crash_all_measured -- \
    --ignored --nocapture --test-threads 1 2>&1 | grep -E "($policy +rep|^$policy:|test result|panicked|lost)"
done

echo "== rolling restart under load (interval)"
cargo test --release --test durability_processes a_rolling_restart_under_load_loses_nothing -- \
  --nocapture --test-threads 1 2>&1 | grep -E "(rolling +rep|test result|panicked)"
