#!/usr/bin/env bash
# How long a rules change of 10,000 limits takes to be in force on every
# node of a 3-node `drl cluster` (real processes on loopback; started here,
# stopped on exit).
#
# Each round puts a rule set of LIMITS limits (625 rules of 16 limits each,
# about 501 KiB of TOML, written tight: under the 512 KiB rules limit) through node 0 with
# If-Match, and times the PUT: the admin API answers 200 only once every
# live node runs the new version (each peer has parsed, compiled and kept
# it on disk, then confirmed it), so the answer's latency is the time to be
# in force everywhere. After each round every node's ETag is checked
# against the answer's. Prints p50, p99 and the slowest of ROUNDS.
#
# Usage: scripts/rules-propagation.sh
# Environment: DRL (binary; default target/release/drl, else
# target/debug/drl), ROUNDS (20), LIMITS (10000, a multiple of 16),
# BASE_PORT (18600).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
DRL=${DRL:-}
if [ -z "$DRL" ]; then
  if [ -x "$TARGET/release/drl" ]; then DRL=$TARGET/release/drl; else DRL=$TARGET/debug/drl; fi
fi
[ -x "$DRL" ] || { echo "no drl binary at $DRL (cargo build --release)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
ROUNDS=${ROUNDS:-20}
LIMITS=${LIMITS:-10000}
BASE_PORT=${BASE_PORT:-18600}
TOKEN=propagation-$$
DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-rules-propagation.XXXXXX")
CLUSTER_PID=

cleanup() {
  if [ -n "$CLUSTER_PID" ]; then
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "binary: $DRL"
RUST_LOG=warn "$DRL" cluster --nodes 3 --dir "$DIR/cluster" --base-port "$BASE_PORT" \
  --admin-token "$TOKEN" >"$DIR/cluster.out" 2>"$DIR/cluster.err" &
CLUSTER_PID=$!

python3 - "$BASE_PORT" "$TOKEN" "$ROUNDS" "$LIMITS" <<'EOF'
import http.client, math, sys, time

base, token, rounds, limits = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
auth = {"authorization": f"Bearer {token}"}

def call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={**auth, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.getheader("etag"), data

def ready(port):
    try:
        return call(port, "GET", "/readyz")[0] == 200
    except OSError:
        return False

deadline = time.time() + 60
while not all(ready(base + i) for i in range(3)):
    if time.time() > deadline:
        sys.exit("the cluster did not become ready within 60 s")
    time.sleep(0.1)

def rules(n):
    out = []
    for r in range(limits // 16):
        # Written tight: 10,000 limits must fit the 512 KiB rules limit.
        entries = ",".join(
            f'{{algorithm="fixed_window",limit={n + j + 1},window="{j + 1}s"}}'
            for j in range(16)
        )
        out.append(f'[[rules]]\nname="r{r}"\nmatch={{customer="c{r}"}}\nlimits=[{entries}]\n')
    return "".join(out)

print(f"rules text: {len(rules(0).encode())} bytes, {limits} limits")
times = []
for i in range(rounds):
    _, etag, _ = call(base, "GET", "/v1/rules")
    body = rules(i + 1).encode()
    start = time.perf_counter()
    status, new_etag, data = call(base, "PUT", "/v1/rules", body, {"if-match": etag})
    elapsed = time.perf_counter() - start
    if status != 200:
        sys.exit(f"round {i}: PUT answered {status}: {data[:300]!r}")
    for node in range(3):
        _, tag, _ = call(base + node, "GET", "/v1/rules")
        if tag != new_etag:
            sys.exit(f"round {i}: node {node} runs {tag}, the PUT answered {new_etag}")
    times.append(elapsed * 1000)
    print(f"round {i + 1:2}: {elapsed * 1000:7.1f} ms  {new_etag}")

times.sort()
def pct(p):
    # Nearest rank: of 20, the p99 is the slowest.
    return times[max(0, math.ceil(p / 100 * len(times)) - 1)]
print(f"in force on all 3 nodes ({len(times)} PUTs of {limits} limits): "
      f"p50 {pct(50):.1f} ms, p99 {pct(99):.1f} ms, slowest {times[-1]:.1f} ms")
EOF
