#!/usr/bin/env bash
# Clock skew on real processes: a 3-node `drl cluster` (loopback, started
# here, stopped on exit) with node 0's clock played OFFSET ms off (the
# node's hidden test clock offset), and a 10/s sliding window (the sample
# rules' `search-per-user`) offered twice its limit, spread evenly over the
# three nodes. Runs each offset twice: with the clocks corrected (the design
# in force) and uncorrected (`--test-clock-uncorrected`, the earlier design).
#
# Load: KEYS users, each at 20 requests/s (2x), round-robin over the nodes,
# for SECONDS seconds (a bounded loop: KEYS·20·SECONDS requests). A request
# answered 503 (a node not admitting, e.g. its clock gate closed) fails over
# to the next node, as the SDK does. Reports, per run: admitted per second
# per node and in total, per key; the most admissions of one key in any 1 s
# window (client time); and the admissions beyond the algorithm: per key,
# what an exact 10-per-second sliding log, fed the cluster's admissions in
# the order the client saw them, refuses.
#
# Usage: scripts/skew.sh
# Environment: DRL (binary; default target/release/drl, else
# target/debug/drl), OFFSETS ("250 -250 500 -500"), RUN_SECONDS (10), KEYS (4),
# BASE_PORT (18700), MODES ("corrected uncorrected").
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
DRL=${DRL:-}
if [ -z "$DRL" ]; then
  if [ -x "$TARGET/release/drl" ]; then DRL=$TARGET/release/drl; else DRL=$TARGET/debug/drl; fi
fi
[ -x "$DRL" ] || { echo "no drl binary at $DRL (cargo build --release)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
OFFSETS=${OFFSETS:-"250 -250 500 -500"}
SECONDS_RUN=${RUN_SECONDS:-10}
KEYS=${KEYS:-4}
BASE_PORT=${BASE_PORT:-18700}
MODES=${MODES:-"corrected uncorrected"}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-skew.XXXXXX")
CLUSTER_PID=

stop_cluster() {
  if [ -n "$CLUSTER_PID" ]; then
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
    CLUSTER_PID=
  fi
}
cleanup() {
  stop_cluster
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "binary: $DRL; ${KEYS} keys at 20/s (2x a 10/s limit) for ${SECONDS_RUN}s, spread over 3 nodes"
run=0
for offset in $OFFSETS; do
  for mode in $MODES; do
    run=$((run + 1))
    extra=()
    [ "$mode" = uncorrected ] && extra+=(--test-clock-uncorrected)
    rm -rf "$DIR/cluster"
    RUST_LOG=warn "$DRL" cluster --nodes 3 --dir "$DIR/cluster" --base-port "$BASE_PORT" \
      --admin-token "skew-$$" --test-clock-offset "0=$offset" "${extra[@]}" \
      >"$DIR/cluster.out" 2>"$DIR/cluster.err" &
    CLUSTER_PID=$!
    python3 - "$BASE_PORT" "$SECONDS_RUN" "$KEYS" "$offset" "$mode" "$run" <<'EOF'
import http.client, json, sys, time
from collections import defaultdict, deque

base, seconds, keys, offset, mode, run = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                          sys.argv[4], sys.argv[5], sys.argv[6])
LIMIT, RATE, NODES = 10, 20, 3

def conn(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=5)

def status(port, method, path, body=None):
    c = conn(port)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status
    except OSError:
        return None
    finally:
        c.close()

deadline = time.time() + 60
while not all(status(base + i, "GET", "/readyz") == 200 for i in range(NODES)):
    if time.time() > deadline:
        sys.exit("the cluster did not become ready within 60 s")
    time.sleep(0.1)

conns = [conn(base + i) for i in range(NODES)]
def check(node, user):
    body = json.dumps({"user": user, "endpoint": "/v1/search"})
    for attempt in range(2):
        try:
            conns[node].request("POST", "/v1/check", body=body,
                                headers={"content-type": "application/json"})
            r = conns[node].getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            conns[node].close()
            conns[node] = conn(base + node)
    return None

users = [f"skew{run}-{k}" for k in range(keys)]
step = 1.0 / (RATE * keys)
total = RATE * keys * seconds
admitted = defaultdict(list)          # user -> [(t, node)]
failovers = unavailable = 0
start = time.time() + 0.2
for i in range(total):
    at = start + i * step
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)
    user = users[i % keys]
    node = (i // keys) % NODES
    for hop in range(NODES):
        n = (node + hop) % NODES
        code = check(n, user)
        if code == 503:
            failovers += 1
            continue
        break
    else:
        code = None
    t = time.time() - start
    if code == 200:
        admitted[user].append((t, n))
    elif code != 429:
        unavailable += 1

def exact_refusals(times):
    kept, refused = deque(), 0
    for t in times:
        while kept and kept[0] <= t - 1.0:
            kept.popleft()
        if len(kept) < LIMIT:
            kept.append(t)
        else:
            refused += 1
    return refused

def max_window(times):
    lo, best = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best

per_node = [0] * NODES
beyond = worst = 0
for u in users:
    times = [t for t, _ in admitted[u]]
    for _, n in admitted[u]:
        per_node[n] += 1
    beyond += exact_refusals(times)
    worst = max(worst, max_window(times))
n_adm = sum(per_node)
per_key_s = n_adm / keys / seconds
print(f"offset {int(offset):+d} ms, {mode:11s}: admitted {per_key_s:5.2f}/s per key "
      f"(limit {LIMIT}/s); per node per key per second "
      + " / ".join(f"{c / keys / seconds:.2f}" for c in per_node)
      + f"; worst 1 s window {worst}; beyond the algorithm {beyond} of {n_adm} "
      f"({100 * beyond / max(n_adm, 1):.1f} %); 503 fail-overs {failovers}, unanswered {unavailable}")
EOF
    stop_cluster
  done
done
