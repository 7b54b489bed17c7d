#!/usr/bin/env bash
# drl over HTTP against Redis with a Lua token bucket, side by side, on this
# machine's loopback.
#
#   scripts/bench-http.sh            # release build, 1-node and 3-node runs, Redis, table
#
# The machine may be shared, so the peak runs are interleaved: ROUNDS
# rounds of (drl 1 node, drl 3 nodes, Redis), and each setup reports its
# median round (decisions/s; its p50 and p99 are those of that round).
# Then drl runs once per cluster size at half its median peak (`--rate`).
#
# Knobs (environment): ROUNDS (3), CONNS (50), DURATION (10s), KEYS (10000 users),
# THREADS (1: threads of both load generators, `drl load --threads` and
# `redis-benchmark --threads`), REDIS_N (requests for redis-benchmark;
# default: enough for about DURATION), CARGO_TARGET_DIR (target),
# BASE_PORT (18500), REDIS_PORT (16379).
#
# Both sides do the same work per request: one token bucket per user
# (capacity 100, refill 10/s), users drawn uniformly from KEYS, 50
# keep-alive connections, one request in flight per connection, load
# generators with the same number of threads. Everything runs on one
# machine, so generator and server share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-50}
DURATION=${DURATION:-10s}
KEYS=${KEYS:-10000}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-18500}
REDIS_PORT=${REDIS_PORT:-16379}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
DURATION_S=${DURATION%s}

echo "== building (release)"
cargo build --release --bin drl
DRL="$TARGET_DIR/release/drl"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

RULES='[[rules]]
name = "bench-per-user"
match = { user = "*" }
limits = [ { algorithm = "token_bucket", capacity = 100, refill = 10, per = "1s" } ]
'

# Starts `drl cluster --nodes N` on BASE_PORT+OFFSET and waits for its banner.
start_cluster() {
  local nodes=$1 port=$2 dir="$WORK/cluster-$1"
  mkdir -p "$dir"
  # A banner left by the previous run in this folder must not count.
  rm -f "$dir/out.log"
  printf '%s' "$RULES" > "$dir/rules.toml"
  RUST_LOG=warn "$DRL" cluster --nodes "$nodes" --dir "$dir" --base-port "$port" \
    > "$dir/out.log" 2> "$dir/err.log" &
  CLUSTER_PID=$!
  PIDS+=("$CLUSTER_PID")
  for _ in $(seq 1 600); do
    grep -q "nodes ready" "$dir/out.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster of $nodes did not start:"; cat "$dir/err.log"; exit 1
}

stop_cluster() {
  kill -TERM "$CLUSTER_PID"
  wait "$CLUSTER_PID" || true
}

urls() {
  local nodes=$1 port=$2 out=""
  for i in $(seq 0 $((nodes - 1))); do
    out="$out${out:+,}http://127.0.0.1:$((port + i))"
  done
  echo "$out"
}

# Prints the `result:` line of a `drl load` run.
load() {
  local out
  out=$("$DRL" load --node "$1" --connections "$CONNS" --duration "$DURATION" --keys "$KEYS" \
    --threads "$THREADS" "${@:2}")
  echo "$out" >&2
  echo "$out" | grep '^result:'
}

field() { # field NAME LINE
  echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

declare -A RPS P50 P99
declare -A RUNS  # setup -> "rps p50 p99;rps p50 p99;..."

record() { # record SETUP RESULT_LINE
  RUNS[$1]="${RUNS[$1]:-}$(field decisions_per_sec "$2") $(field p50_us "$2") $(field p99_us "$2");"
}

# The median round of a setup, by decisions/s, into RPS/P50/P99.
median() {
  local line
  line=$(echo "${RUNS[$1]}" | tr ';' '\n' | grep . | sort -n -k1,1 | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }')
  RPS[$1]=$(echo "$line" | awk '{ print $1 }')
  P50[$1]=$(echo "$line" | awk '{ print $2 }')
  P99[$1]=$(echo "$line" | awk '{ print $3 }')
  ALL[$1]=$(echo "${RUNS[$1]}" | tr ';' '\n' | grep . | awk '{ printf "%s%s", sep, $1; sep = " " }')
}
declare -A ALL

drl_peak() { # drl_peak NODES PORT
  echo "== drl, $1 node(s): peak"
  start_cluster "$1" "$2"
  record "drl$1" "$(load "$(urls "$1" "$2")")"
  stop_cluster
}

drl_half() { # drl_half NODES PORT
  local half=$(( ${RPS[drl$1]} / 2 ))
  echo "== drl, $1 node(s): paced at half the median peak, $half/s"
  start_cluster "$1" "$2"
  record "half$1" "$(load "$(urls "$1" "$2")" --rate "$half")"
  stop_cluster
  median "half$1"
}

echo "== redis"
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  apt-get install -y redis-server redis-tools >/dev/null
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --logfile "$WORK/redis.log" &
PIDS+=("$!")
for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
# One hash per user: tokens and the time of the last update; refill from the
# elapsed time; take `cost` tokens if there are enough.
LUA='
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + (now - ts) * rate / 1000000)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call("HMSET", KEYS[1], "tokens", tokens, "ts", now)
return allowed
'
SHA=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$LUA")
echo "token bucket script: $SHA"
bench_redis() { # bench_redis N
  redis-benchmark -p "$REDIS_PORT" -c "$CONNS" -n "$1" -r "$KEYS" --threads "$THREADS" --csv \
    EVALSHA "$SHA" 1 "bucket:__rand_int__" 100 10 1 | tail -1
}
# Size the Redis runs to about DURATION from a short calibration.
if [ -z "${REDIS_N:-}" ]; then
  CAL_RPS=$(bench_redis 100000 | cut -d, -f2 | tr -d '"' | cut -d. -f1)
  REDIS_N=$(( CAL_RPS * DURATION_S ))
fi
redis_peak() {
  echo "== redis: $REDIS_N requests"
  local out
  out=$(bench_redis "$REDIS_N")
  echo "redis-benchmark: $out" >&2
  # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  local rps p50 p99
  rps=$(echo "$out" | cut -d, -f2 | tr -d '"' | cut -d. -f1)
  p50=$(echo "$out" | cut -d, -f5 | tr -d '"' | awk '{ printf "%.1f", $1 * 1000 }')
  p99=$(echo "$out" | cut -d, -f7 | tr -d '"' | awk '{ printf "%.1f", $1 * 1000 }')
  record redis "result: decisions_per_sec=$rps p50_us=$p50 p99_us=$p99"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  drl_peak 1 "$BASE_PORT"
  drl_peak 3 "$((BASE_PORT + 10))"
  redis_peak
done
for s in drl1 drl3 redis; do median "$s"; done
drl_half 1 "$BASE_PORT"
drl_half 3 "$((BASE_PORT + 10))"
echo "redis keys: $(redis-cli -p "$REDIS_PORT" DBSIZE)"

echo
echo "== results: $CONNS connections, $DURATION per run, $KEYS users, token bucket 100 + 10/s, $THREADS generator thread(s), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-32s %12s %10s %10s %9s   %s\n' "setup" "decisions/s" "p50 (us)" "p99 (us)" "vs redis" "all rounds (decisions/s)"
row() {
  local ratio
  ratio=$(awk -v a="${RPS[$2]}" -v b="${RPS[redis]}" 'BEGIN { printf "%.2fx", a / b }')
  printf '%-32s %12s %10s %10s %9s   %s\n' "$1" "${RPS[$2]}" "${P50[$2]}" "${P99[$2]}" "$ratio" "${ALL[$2]}"
}
row "drl, 1 node, peak" drl1
row "drl, 3 nodes, peak" drl3
row "redis + Lua token bucket" redis
row "drl, 1 node, at half its peak" half1
row "drl, 3 nodes, at half its peak" half3
