#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 10)
# from its seeds, and keeps any crash input as a regression input under
# fuzz/regressions/<target>/ (replayed by `cargo test`, see
# tests/fuzz_regressions.rs). Exits non-zero if any target crashed.
#
#   fuzz/run.sh                  # every target, 10 s each
#   FUZZ_SECONDS=60 fuzz/run.sh wire_frame snapshot
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz's build flags
# are nightly-only; RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them,
# and `-s none` builds without a sanitizer (stable has none), which keeps
# the coverage instrumentation libFuzzer needs.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH=${FUZZ_SECONDS:-10}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(wire_frame replicator_frame snapshot check_body query refund_body rules_file resp_frame)
fi
export RUSTC_BOOTSTRAP=1

echo "== build the fuzz targets (coverage-instrumented, release)"
cargo fuzz build -s none
WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$WORK/corpus/$t" "$WORK/artifacts/$t" "regressions/$t"
  cp seeds/"$t"/* "$WORK/corpus/$t/"
  echo "== fuzz $t for ${SECONDS_EACH}s"
  if cargo fuzz run -s none "$t" "$WORK/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
      -artifact_prefix="$WORK/artifacts/$t/" > "$WORK/$t.log" 2>&1; then
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$WORK/$t.log" | tr '\n' ' '
    echo
  else
    tail -30 "$WORK/$t.log"
    for a in "$WORK/artifacts/$t"/*; do
      [ -f "$a" ] || continue
      cp "$a" "regressions/$t/"
      echo "kept $(basename "$a") as fuzz/regressions/$t/$(basename "$a"): commit it with the fix"
    done
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that crashed: ${failed[*]}"
  exit 1
fi
echo "every fuzz target ran ${SECONDS_EACH}s without a crash"
