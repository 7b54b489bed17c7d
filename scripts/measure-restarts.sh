#!/usr/bin/env bash
# Two figures of the restart issue, measured with real `drl node` processes
# (three nodes over QUIC on loopback; everything is started here and stopped
# on exit; nothing listens beyond 127.0.0.1):
#
#   stall  — a silent peer: node 2 is SIGSTOPped for STOP_SECONDS while a key
#            with quota left is hammered through nodes 0 and 1; prints the
#            longest gap with zero admissions before the stop, during it, and
#            after SIGCONT.
#   ready  — ROUNDS restarts (kill -9, start again, nodes in turn) with live
#            peers; prints the time from the process start to `/readyz` 200:
#            median, p99 and slowest.
#
# Usage:
#   scripts/measure-restarts.sh                # both
#   scripts/measure-restarts.sh stall
#   scripts/measure-restarts.sh ready
# Environment: DRL (binary; default target/release/drl, else target/debug/drl),
# STOP_SECONDS (5), ROUNDS (20), BASE_PORT (18400), LIMIT (30000 per hour),
# DISCOVERY_INTERVAL and RECOVERY_TIMEOUT (node defaults unless set).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
DRL=${DRL:-}
if [ -z "$DRL" ]; then
  if [ -x "$TARGET/release/drl" ]; then DRL=$TARGET/release/drl; else DRL=$TARGET/debug/drl; fi
fi
[ -x "$DRL" ] || { echo "no drl binary at $DRL (cargo build --release)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
STOP_SECONDS=${STOP_SECONDS:-5}
ROUNDS=${ROUNDS:-20}
BASE_PORT=${BASE_PORT:-18400}
# The key's hourly limit: large enough to last the run, small enough that a
# node's in-flight share (2 % of it, split between the nodes) runs out in
# well under a second of hammering if acknowledgements stop.
LIMIT=${LIMIT:-30000}
# Node settings left at their defaults unless given (e.g. DISCOVERY_INTERVAL=200ms,
# what `drl cluster` writes).
DISCOVERY_INTERVAL=${DISCOVERY_INTERVAL:-}
RECOVERY_TIMEOUT=${RECOVERY_TIMEOUT:-}
N=3
DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-measure.XXXXXX")
declare -a PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do
    [ -n "$pid" ] || continue
    kill -CONT "$pid" 2>/dev/null || true
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

http_port() { echo $((BASE_PORT + $1)); }
peer_port() { echo $((BASE_PORT + 100 + $1)); }

"$DRL" certs --dir "$DIR/certs" --nodes $N >/dev/null
cat >"$DIR/rules.toml" <<'RULES'
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = LIMIT_VALUE, window = "1h" } ]
RULES
sed -i "s/LIMIT_VALUE/$LIMIT/" "$DIR/rules.toml"
for slot in $(seq 0 $((N - 1))); do
  seeds=$(for s in $(seq 0 $((N - 1))); do [ "$s" = "$slot" ] || printf '"127.0.0.1:%s", ' "$(peer_port "$s")"; done)
  cat >"$DIR/node-$slot.toml" <<CONF
name = "node-$slot"
slot = $slot
cluster_size = $N
listen_peer = "127.0.0.1:$(peer_port "$slot")"
listen_http = "127.0.0.1:$(http_port "$slot")"
seeds = [${seeds%, }]
rules = "rules.toml"
data_dir = "data"
tls_ca = "certs/ca.pem"
tls_cert = "certs/node-$slot.pem"
tls_key = "certs/node-$slot-key.pem"
key_seed = "000102030405060708090a0b0c0d0e0f"
CONF
  [ -z "$DISCOVERY_INTERVAL" ] || echo "discovery_interval = \"$DISCOVERY_INTERVAL\"" >>"$DIR/node-$slot.toml"
  [ -z "$RECOVERY_TIMEOUT" ] || echo "recovery_timeout = \"$RECOVERY_TIMEOUT\"" >>"$DIR/node-$slot.toml"
done

start() {
  (cd "$DIR" && RUST_LOG=warn exec "$DRL" node --config "node-$1.toml" >>"node-$1.log" 2>&1) &
  PIDS[$1]=$!
}

# Waits until node $1 answers /readyz with 200; prints the seconds it took
# from $2 (a `date +%s.%N` stamp). Gives up after 30 s.
wait_ready() {
  python3 - "$(http_port "$1")" "$2" <<'PY'
import sys, time, http.client
port, since = int(sys.argv[1]), float(sys.argv[2])
deadline = time.time() + 30
while time.time() < deadline:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/readyz")
        if c.getresponse().status == 200:
            print(f"{time.time() - since:.3f}")
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.005)
sys.exit(f"node on port {port} not ready after 30 s")
PY
}

start_all() {
  for slot in $(seq 0 $((N - 1))); do start "$slot"; done
  local t0; t0=$(date +%s.%N)
  for slot in $(seq 0 $((N - 1))); do wait_ready "$slot" "$t0" >/dev/null; done
}

measure_stall() {
  echo "== stall: node 2 SIGSTOPped for ${STOP_SECONDS}s, a key with quota left hammered through nodes 0 and 1"
  local stop_at=2 total=$((STOP_SECONDS + 4))
  python3 - "$(http_port 0)" "$(http_port 1)" "$total" "$stop_at" "$STOP_SECONDS" "${PIDS[2]}" <<'PY'
import sys, time, os, signal, threading, http.client
ports = [int(sys.argv[1]), int(sys.argv[2])]
total, stop_at, stop_for, pid = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
admitted = {p: [] for p in ports}
refused = {p: 0 for p in ports}
start = time.time()
def client(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = b'{"user":"stall"}'
    while time.time() - start < total:
        try:
            conn.request("POST", "/v1/check", body, {"content-type": "application/json"})
            r = conn.getresponse(); r.read()
            if r.status == 200:
                admitted[port].append(time.time() - start)
            else:
                refused[port] += 1
        except (OSError, http.client.HTTPException):
            conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
threads = [threading.Thread(target=client, args=(p,)) for p in ports]
for t in threads: t.start()
time.sleep(stop_at); os.kill(pid, signal.SIGSTOP); stopped = time.time() - start
time.sleep(stop_for); os.kill(pid, signal.SIGCONT); resumed = time.time() - start
for t in threads: t.join()
def longest_gap(ts, lo, hi):
    pts = [lo] + [t for t in ts if lo <= t <= hi] + [hi]
    return max(b - a for a, b in zip(pts, pts[1:]))
for p in ports:
    ts = admitted[p]
    print(f"node on port {p}: {len(ts)} admitted, {refused[p]} refused; longest gap with zero admissions:"
          f" before the stop {1000*longest_gap(ts, 0.5, stopped):.0f} ms,"
          f" while node 2 is stopped {1000*longest_gap(ts, stopped, resumed):.0f} ms,"
          f" after SIGCONT {1000*longest_gap(ts, resumed, total):.0f} ms")
PY
}

measure_ready() {
  echo "== ready: $ROUNDS restarts (kill -9, start again) with live peers; process start to /readyz 200"
  local times=()
  for round in $(seq 0 $((ROUNDS - 1))); do
    local slot=$((round % N))
    { kill -9 "${PIDS[$slot]}"; wait "${PIDS[$slot]}"; } 2>/dev/null || true
    local t0; t0=$(date +%s.%N)
    start "$slot"
    times+=("$(wait_ready "$slot" "$t0")")
    for s in $(seq 0 $((N - 1))); do wait_ready "$s" "$(date +%s.%N)" >/dev/null; done
  done
  printf '%s\n' "${times[@]}" | python3 -c '
import sys
t = sorted(float(x) for x in sys.stdin if x.strip())
p99 = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
print(f"{len(t)} restarts: min {1000*t[0]:.0f} ms, median {1000*t[len(t)//2]:.0f} ms, p99 {1000*p99:.0f} ms, slowest {1000*t[-1]:.0f} ms")'
}

echo "drl: $DRL"
start_all
case "${1:-both}" in
  stall) measure_stall ;;
  ready) measure_ready ;;
  both) measure_stall; measure_ready ;;
  *) echo "usage: $0 [stall|ready|both]" >&2; exit 2 ;;
esac
