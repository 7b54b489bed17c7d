#!/usr/bin/env bash
# drl over the network against Redis with a Lua token bucket, with the same
# clients, on this machine's loopback only. Stops by itself (a few minutes).
#
#   scripts/bench-network.sh
#
# The headline figure beside throughput is the server's CPU per decision:
# the server process's utime + stime (/proc/PID/stat) over a run, divided by
# the decisions it answered in that run (drl: the growth of
# drl_decisions_total; Redis: of EVALSHA's calls in INFO commandstats). The
# load generator shares the machine's cores with the server, so throughput
# says as much about the generator as about the server; CPU per decision
# does not.
#
# 1. RESP, same client: `redis-benchmark` (c=CONNS, with and without -P 16,
#    keys drawn from 10k and 1M with -r) runs Redis's EVALSHA of a Lua token
#    bucket and drl's `CL.THROTTLE` on the same bucket (capacity 100, 10/s).
# 2. HTTP and gRPC, one generator: `h2load` runs drl's HTTP API over
#    HTTP/1.1 and over HTTP/2 (h2c), its gRPC `drl.v1.RateLimiter/Check`,
#    and Envoy's pattern: `ShouldRateLimit` with 2 descriptors over 2 HTTP/2
#    connections with 50 streams each (100 in flight).
# 3. Latency at a fixed rate, half of the node's median peak, open loop with
#    corrected latency: `oha --latency-correction` over HTTP (if oha is
#    installed; else `drl load --rate`, which corrects the same way), and
#    `drl load --resp --rate` over RESP. oha builds with `cargo install oha
#    --locked --no-default-features --features native-tls` (a long build;
#    `--locked` keeps its dependencies at versions this toolchain builds).
# 4. Cluster scaling: 1 and 3 nodes with the generator (`drl load --resp`)
#    pinned to core 0 and the nodes to the other cores (`taskset`).
#
# Rounds are interleaved (every setup once per round); each setup reports
# its median round. Knobs (environment): ROUNDS (3), CONNS (50), DURATION
# (5, seconds per run), BASE_PORT (18600), REDIS_PORT (16380),
# CARGO_TARGET_DIR (target), OUT (where the table is written: a file in the
# temporary folder, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
DURATION=${DURATION:-5}
BASE_PORT=${BASE_PORT:-18600}
REDIS_PORT=${REDIS_PORT:-16380}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
HTTP1=$BASE_PORT          # node i: HTTP BASE_PORT+i
GRPC1=$((BASE_PORT + 100)) # gRPC
RESP1=$((BASE_PORT + 200)) # RESP
HTTP3=$((BASE_PORT + 10))
RESP3=$((BASE_PORT + 210))
GRPC3=$((BASE_PORT + 110))

need() { command -v "$1" >/dev/null || apt-get install -y "$2" >/dev/null; }
need redis-server redis-server
need redis-benchmark redis-tools
need h2load nghttp2-client
need taskset util-linux
need curl curl

echo "== building (release)"
cargo build --release --bin drl
DRL="$TARGET_DIR/release/drl"
OHA=$(command -v oha || true)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-bench-net.XXXXXX")
OUT=${OUT:-$WORK.md}
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

RULES='[[rules]]
name = "bench-per-user"
match = { user = "*" }
limits = [ { algorithm = "token_bucket", capacity = 100, refill = 10, per = "1s" } ]
'

# start_cluster NODES HTTP GRPC RESP [CPUS]: `drl cluster`, ready.
start_cluster() {
  local nodes=$1 dir="$WORK/cluster-$1" pin=()
  [ -n "${5:-}" ] && pin=(taskset -c "$5")
  mkdir -p "$dir"
  rm -f "$dir/out.log"
  printf '%s' "$RULES" > "$dir/rules.toml"
  RUST_LOG=warn "${pin[@]}" "$DRL" cluster --nodes "$nodes" --dir "$dir" --base-port "$2" \
    --grpc-base-port "$3" --resp-base-port "$4" --http2 > "$dir/out.log" 2> "$dir/err.log" &
  CLUSTER_PID=$!
  PIDS+=("$CLUSTER_PID")
  for _ in $(seq 1 600); do
    grep -q "nodes ready" "$dir/out.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "nodes ready" "$dir/out.log" || { echo "cluster of $nodes did not start:"; cat "$dir/err.log"; exit 1; }
  # The (first) node: a child of `drl cluster`.
  NODE_PID=$(pgrep -P "$CLUSTER_PID" | head -1)
  # Put the CL.THROTTLE triple's rule in force before anything is measured.
  redis-cli -p "$4" CL.THROTTLE warmup 99 10 1 >/dev/null
}
stop_cluster() { kill -TERM "$CLUSTER_PID"; wait "$CLUSTER_PID" || true; }

echo "== redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --logfile "$WORK/redis.log" &
PIDS+=("$!")
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
# The token bucket of scripts/bench-http.sh: one hash per key.
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
REDIS_PID=${PIDS[-1]}

# Server CPU per decision: CPU ticks of a process, and decisions answered.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
redis_decisions() {
  redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' \
    | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\).*/\1/p'
}
# drl_decisions [PROTOCOL [PER_CALL]]: decisions of the node on HTTP1 (all
# protocols, or one), divided by PER_CALL (a call that decides 2
# descriptors counts 2 decisions: per call, divide by 2).
drl_decisions() {
  curl -s "http://127.0.0.1:$HTTP1/metrics" \
    | awk -v p="${1:-}" -v per="${2:-1}" '/^drl_decisions_total\{/ && (p == "" || index($0, "protocol=\"" p "\"")) { s += $NF }
        END { printf "%d\n", s / per }'
}
# with_cpu PID COUNTER... -- CMD...: runs CMD (which prints "rps p50 p99")
# and prints "rps p50 p99 cpu_us_per_decision".
with_cpu() {
  local pid=$1 counter=() t0 c0 t1 c1 r
  shift
  while [ "$1" != "--" ]; do counter+=("$1"); shift; done
  shift
  t0=$(cpu_ticks "$pid"); c0=$("${counter[@]}")
  r=$("$@")
  t1=$(cpu_ticks "$pid"); c1=$("${counter[@]}")
  echo "$r" | awk -v dt=$((t1 - t0)) -v dc=$((c1 - c0)) -v hz="$CLK_TCK" \
    '{ printf "%s %s %s %.2f\n", $1, $2, $3, (dc > 0 ? dt / hz * 1e6 / dc : 0) }'
}

declare -A RUNS
record() { RUNS[$1]="${RUNS[$1]:-}$2;"; }   # record SETUP "rps p50_us p99_us [cpu_us]"
median_of() { # the median round by decisions/s: "rps p50 p99 cpu"
  echo "${RUNS[$1]}" | tr ';' '\n' | grep . | sort -n -k1,1 \
    | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'
}
median_cpu() { # the median CPU per decision over the rounds
  echo "${RUNS[$1]}" | tr ';' '\n' | grep . | awk '{ print ($4 == "" ? "-" : $4) }' | sort -g \
    | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'
}
all_cpu() { echo "${RUNS[$1]}" | tr ';' '\n' | grep . | awk '{ printf "%s%s", s, ($4 == "" ? "-" : $4); s = " " }'; }
all_of() { echo "${RUNS[$1]}" | tr ';' '\n' | grep . | awk '{ printf "%s%s", s, $1; s = " " }'; }

# redis-benchmark PORT KEYS PIPELINE N ARGS...: "rps p50_us p99_us"
rb() {
  local port=$1 keys=$2 pipe=$3 n=$4
  shift 4
  redis-benchmark -p "$port" -c "$CONNS" -n "$n" -r "$keys" -P "$pipe" --csv "$@" 2>/dev/null | tail -1 \
    | awk -F',' '{ for (i = 1; i <= NF; i++) gsub(/"/, "", $i); printf "%d %.0f %.0f\n", $2, $5 * 1000, $7 * 1000 }'
}
redis_cmd() { echo EVALSHA "$SHA" 1 "bucket:__rand_int__" 100 10 1; }
drl_cmd() { echo CL.THROTTLE "user:__rand_int__" 99 10 1; }

start_cluster 1 "$HTTP1" "$GRPC1" "$RESP1"
# Size each redis-benchmark run to about DURATION from a short calibration.
declare -A N
for pipe in 1 16; do
  for target in redis drl; do
    if [ "$target" = redis ]; then port=$REDIS_PORT; cmd=$(redis_cmd); else port=$RESP1; cmd=$(drl_cmd); fi
    # shellcheck disable=SC2086
    rps=$(rb "$port" 10000 "$pipe" $((20000 * pipe)) $cmd | awk '{ print $1 }')
    [ "${rps:-0}" -gt 0 ] || { echo "calibration of $target failed"; exit 1; }
    N[$target-$pipe]=$(( rps * DURATION ))
    echo "calibration: $target -P $pipe: $rps/s"
  done
done

# The body of a gRPC drl.v1.RateLimiter/Check: CheckRequest { descriptors:
# { "user": "user-1" } }, in a gRPC frame (uncompressed, 16 bytes).
printf '\x00\x00\x00\x00\x10\x0a\x0e\x0a\x04user\x12\x06user-1' > "$WORK/grpc.bin"
# Envoy's ShouldRateLimit with 2 descriptors: RateLimitRequest { domain:
# "bench", descriptors: [ [user=user-1], [user=user-2] ] }, in a gRPC frame.
python3 - "$WORK/envoy.bin" <<'PY'
import struct, sys
def field(n, payload): return bytes([n << 3 | 2, len(payload)]) + payload
def entry(k, v): return field(1, field(1, k.encode()) + field(2, v.encode()))
msg = field(1, b"bench") + field(2, entry("user", "user-1")) + field(2, entry("user", "user-2"))
open(sys.argv[1], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
PY
# 10k users for the HTTP API, cycled by every h2load client.
for i in $(seq 0 9999); do echo "http://127.0.0.1:$HTTP1/v1/allow?user=user-$i"; done > "$WORK/uris1"

# h2load ARGS...: "rps mean_us -" (c=CONNS, 1 stream each, unless H2C/H2M)
h2() {
  h2load -c "${H2C:-$CONNS}" -m "${H2M:-1}" -D "$DURATION" --warm-up-time 1 "$@" 2>&1 \
    | awk '/^finished in/ { rps = $4 } /^time for request:/ { m = $6; u = m; sub(/[a-z]+$/, "", u);
           if (m ~ /ms$/) u *= 1000; else if (m ~ /us$/) u += 0; else u *= 1000000 }
           /^status codes:|^requests:/ { print > "/dev/stderr" } END { printf "%d %.0f -\n", rps, u }'
}

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  for keys in 10000 1000000; do
    for pipe in 1 16; do
      # shellcheck disable=SC2046
      r=$(with_cpu "$REDIS_PID" redis_decisions -- rb "$REDIS_PORT" "$keys" "$pipe" "${N[redis-$pipe]}" $(redis_cmd))
      echo "redis   keys=$keys P=$pipe: $r"
      record "redis-$keys-$pipe" "$r"
      # shellcheck disable=SC2046
      r=$(with_cpu "$NODE_PID" drl_decisions resp -- rb "$RESP1" "$keys" "$pipe" "${N[drl-$pipe]}" $(drl_cmd))
      echo "drl     keys=$keys P=$pipe: $r"
      record "drl-$keys-$pipe" "$r"
    done
  done
  r=$(with_cpu "$NODE_PID" drl_decisions http -- h2 --h1 -i "$WORK/uris1"); echo "http/1.1: $r"; record http1 "$r"
  r=$(with_cpu "$NODE_PID" drl_decisions http -- h2 -i "$WORK/uris1"); echo "h2c: $r"; record h2c "$r"
  r=$(with_cpu "$NODE_PID" drl_decisions grpc -- h2 -d "$WORK/grpc.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$GRPC1/drl.v1.RateLimiter/Check"); echo "grpc: $r"; record grpc "$r"
  r=$(H2C=2 H2M=50 with_cpu "$NODE_PID" drl_decisions grpc 2 -- h2 -d "$WORK/envoy.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$GRPC1/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
  echo "envoy: $r"; record envoy "$r"
done

# Half of the node's median peaks, open loop, corrected latency.
HALF_HTTP=$(( $(median_of http1 | awk '{ print $1 }') / 2 ))
HALF_RESP=$(( $(median_of drl-10000-1 | awk '{ print $1 }') / 2 ))
echo "== fixed rate: HTTP at $HALF_HTTP/s, RESP at $HALF_RESP/s"
if [ -n "$OHA" ]; then
  HALF_TOOL="oha --latency-correction"
  "$OHA" -z "$((DURATION * 2))s" -c "$CONNS" -q "$HALF_HTTP" --latency-correction --no-tui \
    --output-format json --rand-regex-url "http://127.0.0.1:$HTTP1/v1/allow\\?user=user-[0-9]{4}" \
    > "$WORK/oha.json"
  r=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); s=d["summary"]; p=d["latencyPercentiles"]
print("%d %.0f %.0f" % (s["requestsPerSec"], p["p50"]*1e6, p["p99"]*1e6))' "$WORK/oha.json")
else
  HALF_TOOL="drl load --rate"
  r=$("$DRL" load --node "http://127.0.0.1:$HTTP1" --connections "$CONNS" --duration "$((DURATION * 2))s" \
      --keys 10000 --rate "$HALF_HTTP" | grep '^result:' \
      | sed -E 's/.*decisions_per_sec=([0-9]+).*p50_us=([0-9.]+).*p99_us=([0-9.]+).*/\1 \2 \3/')
fi
echo "http at half: $r"; record http-half "$r"
r=$("$DRL" load --resp --node "127.0.0.1:$RESP1" --connections "$CONNS" --duration "$((DURATION * 2))s" \
    --keys 10000 --rate "$HALF_RESP" | grep '^result:' \
    | sed -E 's/.*decisions_per_sec=([0-9]+).*p50_us=([0-9.]+).*p99_us=([0-9.]+).*/\1 \2 \3/')
echo "resp at half: $r"; record resp-half "$r"
stop_cluster

# Cluster scaling with the generator pinned to core 0, the nodes elsewhere.
CORES=$(nproc)
NODE_CPUS=$([ "$CORES" -gt 1 ] && echo "1-$((CORES - 1))" || echo 0)
pinned() { # pinned NODES RESP_BASE
  local nodes=$1 list="" i
  for i in $(seq 0 $((nodes - 1))); do list="$list${list:+,}127.0.0.1:$(($2 + i))"; done
  taskset -c 0 "$DRL" load --resp --node "$list" --connections "$CONNS" --duration "${DURATION}s" \
    --keys 10000 | grep '^result:' \
    | sed -E 's/.*decisions_per_sec=([0-9]+).*p50_us=([0-9.]+).*p99_us=([0-9.]+).*/\1 \2 \3/'
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== scaling round $round of $ROUNDS (nodes on cores $NODE_CPUS)"
  start_cluster 1 "$HTTP1" "$GRPC1" "$RESP1" "$NODE_CPUS"
  r=$(pinned 1 "$RESP1"); echo "1 node: $r"; record scale1 "$r"
  stop_cluster
  start_cluster 3 "$HTTP3" "$GRPC3" "$RESP3" "$NODE_CPUS"
  r=$(pinned 3 "$RESP3"); echo "3 nodes: $r"; record scale3 "$r"
  stop_cluster
done

row() { # row LABEL SETUP [PEER]
  local m p ratio="" all cpu pcpu cratio="" allc
  m=$(median_of "$2"); all=$(all_of "$2"); cpu=$(median_cpu "$2"); allc=$(all_cpu "$2")
  if [ -n "${3:-}" ]; then
    p=$(median_of "$3"); pcpu=$(median_cpu "$3")
    ratio=$(awk -v a="${m%% *}" -v b="${p%% *}" 'BEGIN { printf "%.2fx", a / b }')
    cratio=$(awk -v a="$cpu" -v b="$pcpu" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b }')
  fi
  echo "$m" | awk -v l="$1" -v r="$ratio" -v all="$all" -v c="$cpu" -v cr="$cratio" -v allc="$allc" \
    '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", l, c, cr, $1, r, $2, $3, allc, all }'
}
{
  echo "$CONNS connections, ${DURATION}s runs, $ROUNDS interleaved rounds (median), token bucket 100 + 10/s per key, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| setup | server CPU per decision (us) | CPU ratio | decisions/s | ratio | p50 (us) | p99 (us) | all rounds (CPU us) | all rounds (decisions/s) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for keys in 10000 1000000; do
    for pipe in 1 16; do
      row "Redis + Lua, redis-benchmark, $keys keys, -P $pipe" "redis-$keys-$pipe"
      row "drl RESP CL.THROTTLE, redis-benchmark, $keys keys, -P $pipe (vs Redis)" "drl-$keys-$pipe" "redis-$keys-$pipe"
    done
  done
  row "drl HTTP/1.1 GET /v1/allow, h2load, 10k keys (p50 = mean; vs Redis, 10k keys, -P 1)" http1 redis-10000-1
  row "drl HTTP/2 h2c GET /v1/allow, h2load, 10k keys (p50 = mean; vs HTTP/1.1)" h2c http1
  row "drl gRPC drl.v1 Check, h2load, one key (p50 = mean; vs HTTP/1.1)" grpc http1
  row "drl Envoy ShouldRateLimit, 2 descriptors, 2 conns x 50 streams, h2load (per call; p50 = mean; vs HTTP/1.1)" envoy http1
  row "drl HTTP at half its peak, $HALF_TOOL" http-half
  row "drl RESP at half its peak, drl load --resp --rate" resp-half
  row "1 node, generator pinned to core 0, drl load --resp" scale1
  row "3 nodes, generator pinned to core 0, drl load --resp (vs 1 node)" scale3 scale1
} > "$OUT"
echo
cat "$OUT"
echo "(table in $OUT)"
