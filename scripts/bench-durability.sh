#!/usr/bin/env bash
# The throughput cost of each durability policy against `none`, on three
# real `drl node` processes (release build, loopback, a snapshot every
# 10 s beside each node's journal), over HTTP (`drl load`) and RESP
# (`drl load --resp`, CL.THROTTLE).
#
#   scripts/bench-durability.sh          # ROUNDS interleaved rounds of none, interval, sync
#
# Every request is admitted and counted (a 1-hour sliding window far above
# the load; CL.THROTTLE with a burst far above it), so every decision
# changes a value the journal must keep. Each policy reports its median
# round (decisions/s, and that round's p50 and p99), and its change from
# `none`. The machine may be shared: rounds are interleaved so that a
# neighbour's burst hits every policy alike.
#
# Throughput on a machine the nodes share with their load generator moves
# with everything else that runs; what a policy costs the nodes is also
# reported as server CPU per decision (user + system time of the three
# node processes during the load, over the decisions answered), which
# does not depend on how fast the generator could send.
#
# Knobs (environment): ROUNDS (3), CONNS (50), DURATION (10s), KEYS (10000),
# THREADS (1), PROTOCOLS ("http resp"), POLICIES ("none interval sync"),
# BASE_PORT (18600), CARGO_TARGET_DIR (target), DRL (a release binary to use
# instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
DURATION=${DURATION:-10s}
KEYS=${KEYS:-10000}
THREADS=${THREADS:-1}
PROTOCOLS=${PROTOCOLS:-http resp}
POLICIES=${POLICIES:-none interval sync}
BASE_PORT=${BASE_PORT:-18600}
TARGET=${CARGO_TARGET_DIR:-target}
N=3

if [ -z "${DRL:-}" ]; then
  echo "== building (release)"
  cargo build --release --bin drl
  DRL=$TARGET/release/drl
fi
DRL=$(realpath "$DRL")

DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-bench-durability.XXXXXX")
declare -a PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

http_port() { echo $((BASE_PORT + $1)); }
resp_port() { echo $((BASE_PORT + 10 + $1)); }
peer_port() { echo $((BASE_PORT + 20 + $1)); }

"$DRL" certs --dir "$DIR/certs" --nodes $N >/dev/null
cat >"$DIR/rules.toml" <<'RULES'
[[rules]]
name = "bench-per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 100000000, window = "1h" } ]
RULES

start_cluster() { # start_cluster POLICY
  rm -rf "$DIR/data"
  for slot in $(seq 0 $((N - 1))); do
    local seeds
    seeds=$(for s in $(seq 0 $((N - 1))); do [ "$s" = "$slot" ] || printf '"127.0.0.1:%s", ' "$(peer_port "$s")"; done)
    cat >"$DIR/node-$slot.toml" <<CONF
name = "node-$slot"
slot = $slot
cluster_size = $N
listen_peer = "127.0.0.1:$(peer_port "$slot")"
listen_http = "127.0.0.1:$(http_port "$slot")"
resp_listen = "127.0.0.1:$(resp_port "$slot")"
seeds = [${seeds%, }]
discovery_interval = "200ms"
rules = "rules.toml"
snapshot_path = "data/node-$slot.snapshot"
durability = "$1"
tls_ca = "certs/ca.pem"
tls_cert = "certs/node-$slot.pem"
tls_key = "certs/node-$slot-key.pem"
key_seed = "000102030405060708090a0b0c0d0e0f"
CONF
    (cd "$DIR" && RUST_LOG=warn exec "$DRL" node --config "node-$slot.toml" >>"node-$slot.log" 2>&1) &
    PIDS[slot]=$!
  done
  for slot in $(seq 0 $((N - 1))); do
    for _ in $(seq 1 300); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(http_port "$slot")/readyz")" = 200 ] && break
      sleep 0.1
    done
  done
}

stop_cluster() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

nodes() { # nodes PROTOCOL
  local out=""
  for slot in $(seq 0 $((N - 1))); do
    if [ "$1" = resp ]; then
      out="$out${out:+,}127.0.0.1:$(resp_port "$slot")"
    else
      out="$out${out:+,}http://127.0.0.1:$(http_port "$slot")"
    fi
  done
  echo "$out"
}

field() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# User + system CPU ticks of the node processes, summed.
node_ticks() {
  local total=0 pid
  for pid in "${PIDS[@]}"; do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

declare -A RUNS
for round in $(seq 1 "$ROUNDS"); do
  for protocol in $PROTOCOLS; do
    for policy in $POLICIES; do
      echo "== round $round: $protocol, durability = $policy"
      start_cluster "$policy"
      extra=()
      [ "$protocol" = resp ] && extra=(--resp --cell "999999 999999 1")
      before=$(node_ticks)
      out=$("$DRL" load --node "$(nodes "$protocol")" --connections "$CONNS" --duration "$DURATION" \
        --keys "$KEYS" --threads "$THREADS" "${extra[@]}")
      after=$(node_ticks)
      line=$(echo "$out" | grep '^result:')
      decisions=$(($(field allowed "$line") + $(field denied "$line")))
      cpu=$(awk -v t=$((after - before)) -v u="$TICK_US" -v d="$decisions" 'BEGIN { printf "%.2f", t * u / d }')
      echo "$line cpu_us_per_decision=$cpu"
      stop_cluster
      RUNS[$protocol-$policy]="${RUNS[$protocol-$policy]:-}$(field decisions_per_sec "$line") $(field p50_us "$line") $(field p99_us "$line") $cpu;"
    done
  done
done

echo
echo "| protocol | durability | decisions/s (median of $ROUNDS) | vs none | p50 µs | p99 µs | every round | server CPU µs per decision (median) | vs none | every round |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for protocol in $PROTOCOLS; do
  base=""
  cpu_base=""
  for policy in $POLICIES; do
    runs=$(echo "${RUNS[$protocol-$policy]}" | tr ';' '\n' | grep .)
    line=$(echo "$runs" | sort -n -k1,1 | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }')
    rps=$(echo "$line" | awk '{ print $1 }')
    [ -n "$base" ] || base=$rps
    change=$(awk -v r="$rps" -v b="$base" 'BEGIN { printf "%+.1f %%", (r - b) * 100 / b }')
    all=$(echo "$runs" | awk '{ printf "%s%s", sep, $1; sep = " " }')
    cpu=$(echo "$runs" | sort -n -k4,4 | awk '{ a[NR] = $4 } END { print a[int((NR + 1) / 2)] }')
    [ -n "$cpu_base" ] || cpu_base=$cpu
    cpu_change=$(awk -v r="$cpu" -v b="$cpu_base" 'BEGIN { printf "%+.1f %%", (r - b) * 100 / b }')
    cpu_all=$(echo "$runs" | awk '{ printf "%s%s", sep, $4; sep = " " }')
    echo "| $protocol | $policy | $rps | $change | $(echo "$line" | awk '{ print $2 }') | $(echo "$line" | awk '{ print $3 }') | $all | $cpu | $cpu_change | $cpu_all |"
  done
done
