#!/usr/bin/env bash
# What HTTP/1.1 pipelining costs the server, per build: a 1-node `drl
# cluster` of each binary in turn, `wrk` with DEPTH `GET /v1/allow` per
# write (scripts/wrk-pipeline.lua) and, as the control, one request in
# flight per connection. Reports each round's requests/s and the node's
# CPU per request (user + system time of the node process during the run
# over the requests wrk completed), interleaving builds so that a busy
# neighbour hits each alike.
#
#   scripts/bench-pipelining.sh                          # the release build
#   BUILDS="old/drl target/release/drl" scripts/bench-pipelining.sh
#
# Knobs (environment): BUILDS, ROUNDS (3), CONNS (50), DURATION (5s),
# DEPTH (16), BASE_PORT (18700).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
DURATION=${DURATION:-5s}
DEPTH=${DEPTH:-16}
BASE=${BASE_PORT:-18700}
if [ -z "${BUILDS:-}" ]; then
  cargo build --release --locked --bin drl >/dev/null
  BUILDS=target/release/drl
fi
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/drl-bench-pipelining.XXXXXX")
cluster=""
cleanup() {
  [ -z "$cluster" ] || { kill "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; }
  rm -rf "$dir"
}
trap cleanup EXIT

node_pid() {
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "node --config $dir/c/node-0.toml"; then
      basename "$p"
      return
    fi
  done
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

run() { # run BINARY MODE -> "requests/s cpu_us_per_request"
  rm -rf "$dir/c"
  "$1" cluster --nodes 1 --dir "$dir/c" --base-port "$BASE" --peer-base-port $((BASE + 100)) \
    --grpc-base-port $((BASE + 200)) --admin-token tok >"$dir/cluster.log" 2>&1 &
  cluster=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$BASE/readyz" >/dev/null && break
    sleep 0.1
  done
  local pid before after out requests rps code
  # Every request measured must be a decision, not a refused one.
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$BASE/v1/allow?endpoint=/v1/search&user=probe")
  case $code in 200 | 429) ;; *) echo "the node answered $code, not a decision" >&2; exit 1 ;; esac
  pid=$(node_pid)
  before=$(ticks "$pid")
  if [ "$2" = pipelined ]; then
    out=$(wrk -t1 -c"$CONNS" -d"$DURATION" -s scripts/wrk-pipeline.lua "http://127.0.0.1:$BASE" -- "$DEPTH")
  else
    out=$(wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$BASE/v1/allow?endpoint=/v1/search&user=bench")
  fi
  after=$(ticks "$pid")
  kill "$cluster" 2>/dev/null || true
  wait "$cluster" 2>/dev/null || true
  cluster=""
  requests=$(echo "$out" | awk '/requests in/ { print $1 }')
  rps=$(echo "$out" | awk '/^Requests\/sec/ { printf "%.0f", $2 }')
  awk -v r="$rps" -v t=$((after - before)) -v u="$TICK_US" -v n="$requests" \
    'BEGIN { printf "%s %.2f\n", r, t * u / n }'
}

declare -A RESULT
for round in $(seq 1 "$ROUNDS"); do
  for mode in pipelined single; do
    for build in $BUILDS; do
      r=$(run "$build" "$mode")
      echo "round $round, $mode, $build: $r (requests/s, CPU us per request)"
      RESULT[$build-$mode]="${RESULT[$build-$mode]:-}${RESULT[$build-$mode]:+, }$r"
    done
  done
done

echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| build | mode | requests/s and CPU us per request, each round |"
echo "|---|---|---|"
for mode in pipelined single; do
  for build in $BUILDS; do
    echo "| $build | $mode (depth $([ "$mode" = pipelined ] && echo "$DEPTH" || echo 1)) | ${RESULT[$build-$mode]} |"
  done
done
