#!/usr/bin/env bash
# What a paused node costs the others, on real processes: a 3-node
# `drl cluster` (QUIC on loopback), one key with a fixed-window limit of
# LIMIT per second, offered at 80% of it through nodes 0 and 2 by a bounded
# load loop (one keep-alive connection per node, requests at fixed times);
# node 1 is stopped with SIGSTOP for PAUSE seconds, then SIGCONT, and the
# key is offered at twice its limit through all three nodes for 3 s.
#
# Reported, for the pause: the longest stretch without an admission (beyond
# the time between two requests), the decision p99 and maximum, the 429s
# (every one is false: 80% of the limit always fits); after SIGCONT: the
# most admitted in one window against the limit.
#
# Usage:
#   scripts/pause.sh                     # 100/s and 10/s, fence_after 60ms and off
#   scripts/pause.sh 100                 # one limit
# Environment: DRL (binary; default target/release/drl, else target/debug/drl),
#   PAUSE (10), FENCES ("60ms off"), BASE_PORT (28400).
set -euo pipefail
cd "$(dirname "$0")/.."

DRL=${DRL:-}
if [[ -z "$DRL" ]]; then
  if [[ -x target/release/drl ]]; then DRL=target/release/drl; else DRL=target/debug/drl; fi
fi
[[ -x "$DRL" ]] || { echo "no drl binary: cargo build --release --bin drl" >&2; exit 1; }
PAUSE=${PAUSE:-10}
FENCES=${FENCES:-"60ms off"}
BASE_PORT=${BASE_PORT:-28400}
LIMITS=("$@")
[[ ${#LIMITS[@]} -gt 0 ]] || LIMITS=(100 10)

run() {
  local limit=$1 fence=$2
  local dir
  dir=$(mktemp -d)
  cat >"$dir/rules.toml" <<EOF
[[rules]]
name = "paused"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = $limit, window = "1s" } ]
EOF
  "$DRL" cluster --nodes 3 --dir "$dir" --base-port "$BASE_PORT" \
    --peer-base-port $((BASE_PORT - 1000)) --grpc-base-port $((BASE_PORT + 1000)) \
    --admin-token tok --fence-after "$fence" >"$dir/cluster.log" 2>&1 &
  local cluster=$!
  trap 'kill $cluster 2>/dev/null || true' RETURN
  for i in 0 1 2; do
    for _ in $(seq 1 300); do
      if curl -sf "http://127.0.0.1:$((BASE_PORT + i))/readyz" >/dev/null 2>&1; then break; fi
      sleep 0.1
    done
  done
  local pid
  pid=$(pgrep -P "$cluster" -f "node-1.toml" | head -1)
  [[ -n "$pid" ]] || { echo "node-1 not found" >&2; cat "$dir/cluster.log" >&2; return 1; }
  echo "== limit $limit/s, fence_after $fence (node-1 pid $pid)"
  python3 - "$limit" "$BASE_PORT" "$pid" "$PAUSE" <<'PY'
import http.client, os, signal, sys, threading, time

limit, base, pid, pause = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
warm, after = 2.0, 3.0
log = []  # (phase, sent, answered, status)
lock = threading.Lock()

def loop(node, rate, start, end, phase):
    conn = http.client.HTTPConnection("127.0.0.1", base + node, timeout=5)
    every, n = 1.0 / rate, 0
    while True:
        at = start + n * every
        if at >= end:
            break
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)
        sent = time.time()
        try:
            conn.request("POST", "/v1/check", body='{"user":"paused"}',
                         headers={"content-type": "application/json"})
            r = conn.getresponse(); r.read(); status = r.status
        except Exception:
            conn.close(); conn = http.client.HTTPConnection("127.0.0.1", base + node, timeout=5)
            status = 0
        with lock:
            log.append((phase, sent, time.time(), status))
        n += 1

def phase(nodes, fraction, start, length, name):
    rate = limit * fraction / len(nodes)
    ts = [threading.Thread(target=loop, args=(n, rate, start, start + length, name)) for n in nodes]
    for t in ts: t.start()
    return ts

t0 = time.time() + 0.2
threads = phase([0, 2], 0.8, t0, warm + pause, "pause")
time.sleep(max(0, t0 + warm - time.time()))
os.kill(pid, signal.SIGSTOP)
stopped = time.time()
time.sleep(max(0, stopped + pause - time.time()))
os.kill(pid, signal.SIGCONT)
resumed = time.time()
for t in threads: t.join()
for t in phase([0, 1, 2], 2.0, time.time(), after, "after"): t.join()

during = sorted(e for e in log if e[0] == "pause" and stopped <= e[1] < resumed)
admitted = [e[2] for e in during if e[3] == 200]
marks = [stopped] + admitted + [resumed]
gap = max(b - a for a, b in zip(marks, marks[1:]))
interval = 2 / (limit * 0.8)  # two loops, each at half the rate
lat = sorted(e[2] - e[1] for e in during)
p99 = lat[max(0, int(len(lat) * 0.99 + 0.999999) - 1)] if lat else 0
denied = sum(1 for e in during if e[3] == 429)
errors = sum(1 for e in during if e[3] not in (200, 429))
windows = {}
for e in log:
    if e[0] == "after" and e[3] == 200:
        windows[int(e[2])] = windows.get(int(e[2]), 0) + 1
whole = [v for k, v in sorted(windows.items())][1:-1] or list(windows.values())
print(f"pause: {len(during)} offered, {denied} refused (false 429s), {errors} errors; "
      f"longest gap {gap*1000:.0f} ms (requests every {interval*1000:.1f} ms per node loop); "
      f"decision p99 {p99*1000:.1f} ms, max {lat[-1]*1000 if lat else 0:.1f} ms")
print(f"after SIGCONT (2x through all three): admitted per whole second {whole} against {limit}")
if os.environ.get("TIMELINE"):
    line = {}
    for e in log:
        if e[0] == "pause" and e[1] >= stopped:
            k = int((e[2] - stopped) * 10)
            a, d, x = line.get(k, (0, 0, 0))
            line[k] = (a + (e[3] == 200), d + (e[3] == 429), x + (e[3] not in (200, 429)))
    print("while stopped, per 100 ms (admitted/refused/errors):",
          " ".join(f"{a}/{d}/{x}" for k, (a, d, x) in sorted(line.items())))
    line = {}
    for e in log:
        if e[0] == "after":
            k = int((e[2] - resumed) * 10)
            a, d, x = line.get(k, (0, 0, 0))
            line[k] = (a + (e[3] == 200), d + (e[3] == 429), x + (e[3] not in (200, 429)))
    print("after SIGCONT, per 100 ms (admitted/refused/errors):",
          " ".join(f"{a}/{d}/{x}" for k, (a, d, x) in sorted(line.items())))
PY
  if [[ -n "${TIMELINE:-}" ]]; then
    for i in 0 2; do
      echo "node-$i:"
      curl -s "http://127.0.0.1:$((BASE_PORT + i))/metrics" |
        grep -E '^drl_(peers_fenced_total|confirm_(claims|expired|silent|answered)|local_late_ticks|peer_fenced|peer_live|gossip_full_syncs)' || true
    done
  fi
  kill "$cluster" 2>/dev/null || true
  wait "$cluster" 2>/dev/null || true
  rm -rf "$dir"
}

for limit in "${LIMITS[@]}"; do
  for fence in $FENCES; do
    run "$limit" "$fence"
  done
done
