#!/usr/bin/env bash
# One node's gRPC API beside its HTTP API, in the same run, on this
# machine's loopback:
#
#   scripts/bench-grpc.sh            # release build, a 1-node drl cluster, the table
#
# Three phases of SECONDS each, one after the other, against the same node
# and the same rule (a token bucket per user, capacity 100, refill 10/s;
# users drawn uniformly from 10 000), each with CONCURRENCY calls in flight:
#   - HTTP `POST /v1/check` over CONCURRENCY keep-alive connections (the
#     generator behind `drl load`);
#   - Envoy's `ShouldRateLimit`, one descriptor per call, as CONCURRENCY
#     streams of one HTTP/2 connection;
#   - `drl.v1.RateLimiter/CheckBatch` with 100 checks per call.
# The load generator (examples/grpc_bench.rs) runs on the same machine, so
# generator and server share its cores.
#
# Knobs (environment): SECONDS_PER_PHASE (5), CONCURRENCY (50),
# CARGO_TARGET_DIR (target), BASE_PORT (18600).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-5}
CONCURRENCY=${CONCURRENCY:-50}
BASE_PORT=${BASE_PORT:-18600}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

echo "== building (release)"
cargo build --release --bin drl --example grpc_bench
DRL="$TARGET_DIR/release/drl"
BENCH="$TARGET_DIR/release/examples/grpc_bench"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-bench-grpc.XXXXXX")
CLUSTER_PID=
cleanup() {
  if [ -n "$CLUSTER_PID" ]; then
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/rules.toml" <<'RULES'
[[rules]]
name = "bench-per-user"
match = { user = "*" }
limits = [ { algorithm = "token_bucket", capacity = 100, refill = 10, per = "1s" } ]
RULES

echo "== starting a 1-node cluster"
RUST_LOG=warn "$DRL" cluster --nodes 1 --dir "$WORK" --base-port "$BASE_PORT" \
  --peer-base-port $((BASE_PORT - 1000)) --grpc-base-port $((BASE_PORT + 1000)) \
  > "$WORK/out.log" 2> "$WORK/err.log" &
CLUSTER_PID=$!
for _ in $(seq 1 600); do
  grep -q "nodes ready" "$WORK/out.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "nodes ready" "$WORK/out.log" || { echo "cluster did not start:"; cat "$WORK/err.log"; exit 1; }

echo "== load: $CONCURRENCY in flight, ${SECONDS_PER_PHASE}s per phase"
"$BENCH" "http://127.0.0.1:$BASE_PORT" "http://127.0.0.1:$((BASE_PORT + 1000))" \
  "$SECONDS_PER_PHASE" "$CONCURRENCY"
