#!/usr/bin/env bash
# Overload on one node: CONNS busy connections (4,000) from 4 loopback
# source addresses (127.0.0.1-4, so the per-source cap of 1,024 stays in
# force), every one sending as fast as its answers come back, against the
# HTTP and RESP listeners, with and without overload admission; meanwhile
# the health probe of the operations listener is timed every 100 ms.
# Loopback only; stops by itself (about a minute per setup).
#
#   scripts/overload.sh
#
# Setups (each on a fresh 1-node `drl cluster`):
#   none       queue_deadline = 0s: no shedding (the default); requests queue.
#   shed       queue_deadline = DEADLINE: a request that finds its thread
#              further behind than that is answered at once (HTTP 503 with
#              Retry-After, RESP -TRYAGAIN); the client ignores Retry-After
#              and sends again at once.
#   shed+back  the same, and the client waits as long as Retry-After says
#              (`drl load --honor-retry-after`), as the SDK does.
# Reported per setup: answered decisions per second and their latency
# (p50, p99), shed answers and their p99, other errors (no 5xx other than
# the deliberate 503s is expected), and the health probe's p99 and max.
#
# Knobs (environment): CONNS (4000), DURATION (10, seconds), DEADLINE
# (5ms), MAX_IN_FLIGHT (4096), BASE_PORT (18900), CARGO_TARGET_DIR (target),
# OUT (where the table is written).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-4000}
DURATION=${DURATION:-10}
DEADLINE=${DEADLINE:-5ms}
MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-4096}
BASE_PORT=${BASE_PORT:-18900}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
HTTP=$BASE_PORT
GRPC=$((BASE_PORT + 100))
RESP=$((BASE_PORT + 200))
ADMIN=$((BASE_PORT + 300))
SOURCES=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4

command -v curl >/dev/null || apt-get install -y curl >/dev/null
# Twice the connections, and some, for the node and for the generator.
ulimit -n $((CONNS * 2 + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building (release)"
cargo build --release --bin drl
DRL="$TARGET_DIR/release/drl"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-overload.XXXXXX")
OUT=${OUT:-$WORK.md}
CLUSTER_PID=
cleanup() {
  [ -n "$CLUSTER_PID" ] && { kill -TERM "$CLUSTER_PID" 2>/dev/null || true; wait "$CLUSTER_PID" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT

RULES='[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "token_bucket", capacity = 100, refill = 10, per = "1s" } ]
'

# start DEADLINE: a 1-node cluster with an operations listener, ready.
start() {
  local dir="$WORK/cluster"
  rm -rf "$dir"; mkdir -p "$dir"
  printf '%s' "$RULES" > "$dir/rules.toml"
  DRL_QUEUE_DEADLINE=$1 DRL_MAX_IN_FLIGHT=$MAX_IN_FLIGHT DRL_LISTEN_ADMIN=127.0.0.1:$ADMIN RUST_LOG=warn \
    "$DRL" cluster --nodes 1 --dir "$dir" --base-port "$HTTP" --grpc-base-port "$GRPC" \
    --resp-base-port "$RESP" > "$dir/out.log" 2> "$dir/err.log" &
  CLUSTER_PID=$!
  for _ in $(seq 1 600); do
    grep -q "nodes ready" "$dir/out.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "nodes ready" "$dir/out.log" || { echo "the node did not start:"; cat "$dir/err.log"; exit 1; }
}
stop() { kill -TERM "$CLUSTER_PID"; wait "$CLUSTER_PID" || true; CLUSTER_PID=; }

# probe FILE: the health probe of the operations listener every 100 ms for
# DURATION + 1 s: "status seconds" per line.
probe() {
  local end=$((SECONDS + DURATION + 1))
  while [ "$SECONDS" -lt "$end" ]; do
    curl -s -o /dev/null -m 5 -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$ADMIN/healthz" >> "$1" || echo "000 5" >> "$1"
    sleep 0.1
  done
}

# run LABEL PROTOCOL DEADLINE [--honor-retry-after]: one setup.
ROWS=()
run() {
  local label=$1 proto=$2 deadline=$3 back=${4:-} node args r health
  start "$deadline"
  if [ "$proto" = resp ]; then node=127.0.0.1:$RESP; args=(--resp); else node=http://127.0.0.1:$HTTP; args=(); fi
  : > "$WORK/health"
  probe "$WORK/health" &
  local prober=$!
  r=$("$DRL" load "${args[@]}" --node "$node" --connections "$CONNS" --source "$SOURCES" \
      --duration "${DURATION}s" --timeout 10s --progress 0s --keys 10000 $back | tee "$WORK/load.txt" | grep '^result:')
  wait "$prober" || true
  stop
  grep -E '^  error|^decisions|^shed' "$WORK/load.txt" | sed 's/^/    /' || true
  health=$(awk '{ print $2 * 1000, ($1 == 200 ? 0 : 1) }' "$WORK/health" | sort -g \
    | awk '{ n++; t[n] = $1; bad += $2 } END { printf "%.1f %.1f %d %d", t[int(n * 0.99 + 0.999)], t[n], n, bad }')
  echo "$label: $r | health p99/max ms, probes, failed: $health"
  ROWS+=("$(echo "$r $health" | sed -E 's/.*decisions_per_sec=([0-9]+).*errors=([0-9]+) p50_us=([0-9.]+).*p99_us=([0-9.]+) p999.*shed=([0-9]+) shed_p99_ms=([0-9.]+) (.*)/\1 \3 \4 \5 \6 \2 \7/' \
    | awk -v l="$label" '{ printf "| %s | %s | %.2f | %.2f | %s | %.2f | %s | %s | %s | %s/%s |\n", l, $1, $2 / 1000, $3 / 1000, $4, $5, $6, $7, $8, $10, $9 }')")
}

for proto in http resp; do
  run "$proto, no admission (queue_deadline 0s)" "$proto" 0s
  run "$proto, queue_deadline $DEADLINE, client ignores Retry-After" "$proto" "$DEADLINE"
  run "$proto, queue_deadline $DEADLINE, client honors Retry-After" "$proto" "$DEADLINE" --honor-retry-after
done

{
  echo "$CONNS busy connections from 4 loopback addresses, ${DURATION}s per setup, 1 node, $(nproc) cores (generator and node share them), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| setup | decisions/s | decisions p50 (ms) | decisions p99 (ms) | shed | shed p99 (ms) | other errors | health p99 (ms) | health max (ms) | health failed/probes |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} > "$OUT"
echo
cat "$OUT"
echo "(table in $OUT)"
