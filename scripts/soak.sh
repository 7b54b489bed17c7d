#!/usr/bin/env bash
# Soak: one node at half its measured peak with a million rotating users,
# its resident memory every SAMPLE_S seconds, and the latency of a normal
# client running alongside.
#
#   scripts/soak.sh                      # 10 minutes (the reference run)
#   DURATION_S=90 scripts/soak.sh        # a shortened run
#
# Steps: release build; `drl node` on loopback (a separate operations
# port); a PEAK_S-second `drl load` at full speed over KEYS users gives the
# peak; then for DURATION_S seconds `drl load --rate <peak/2>` over KEYS
# users, and a normal client (1 connection, 50 requests/s, 100 users) whose
# p50/p99 is printed at the end. VmRSS of the node is printed every
# SAMPLE_S seconds; the last line compares the growth of the last third of
# the run with the whole run ("flat" when the last third grew < 5%).
#
# Knobs (environment): DURATION_S (600), KEYS (1000000), PEAK_S (10),
# SAMPLE_S (10), CONNS (50), PORT (18700), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION_S=${DURATION_S:-600}
KEYS=${KEYS:-1000000}
PEAK_S=${PEAK_S:-10}
SAMPLE_S=${SAMPLE_S:-10}
CONNS=${CONNS:-50}
PORT=${PORT:-18700}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

echo "== building (release)"
cargo build --release --bin drl
DRL="$TARGET_DIR/release/drl"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-soak.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

"$DRL" certs --dir "$WORK/certs" --nodes 1 >/dev/null
# A sliding window per user: a key lives for two 10 s buckets after its
# last hit, so the live set is about rate × 20 s keys.
cat > "$WORK/rules.toml" <<'RULES'
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = 100, window = "10s" } ]
RULES
cat > "$WORK/node.toml" <<NODE
name = "node-0"
slot = 0
cluster_size = 1
listen_http = "127.0.0.1:$PORT"
listen_admin = "127.0.0.1:$((PORT + 1))"
listen_peer = "127.0.0.1:$((PORT + 2))"
rules = "rules.toml"
recovery_timeout = "100ms"
tls_ca = "certs/ca.pem"
tls_cert = "certs/node-0.pem"
tls_key = "certs/node-0-key.pem"
NODE

RUST_LOG=warn "$DRL" node --config "$WORK/node.toml" > "$WORK/node.log" 2>&1 &
NODE_PID=$!
PIDS+=("$NODE_PID")
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$((PORT + 1))/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
URL="http://127.0.0.1:$PORT"
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$NODE_PID/status"; }

field() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

echo "== peak: ${PEAK_S}s at full speed over $KEYS users"
PEAK_LINE=$("$DRL" load --node "$URL" --connections "$CONNS" --duration "${PEAK_S}s" --keys "$KEYS" --seed 11 | grep '^result:')
echo "$PEAK_LINE"
PEAK=$(field decisions_per_sec "$PEAK_LINE" | cut -d. -f1)
HALF=$((PEAK / 2))
echo "== soak: ${DURATION_S}s at $HALF/s over $KEYS users; RSS every ${SAMPLE_S}s"

"$DRL" load --node "$URL" --connections "$CONNS" --duration "${DURATION_S}s" --keys "$KEYS" \
  --rate "$HALF" --seed 12 > "$WORK/soak.out" 2>&1 &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
"$DRL" load --node "$URL" --connections 1 --duration "${DURATION_S}s" --keys 100 \
  --rate 50 --seed 13 --user-field user > "$WORK/normal.out" 2>&1 &
NORMAL_PID=$!
PIDS+=("$NORMAL_PID")

SAMPLES=()
START=$(date +%s)
while kill -0 "$LOAD_PID" 2>/dev/null; do
  sleep "$SAMPLE_S"
  kill -0 "$NODE_PID" 2>/dev/null || { echo "the node died"; cat "$WORK/node.log"; exit 1; }
  R=$(rss)
  SAMPLES+=("$R")
  KEYS_NOW=$( (curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" || true) | awk '$1 ~ /keys_tracked$/ && !seen { print $2; seen = 1 }')
  echo "t=$(( $(date +%s) - START ))s rss_kib=$R keys_tracked=${KEYS_NOW:-?}"
done
wait "$LOAD_PID" || true
wait "$NORMAL_PID" || true

echo "== soak load"
grep '^result:' "$WORK/soak.out" || cat "$WORK/soak.out"
echo "== normal client (1 connection, 50/s)"
NORMAL=$(grep '^result:' "$WORK/normal.out" || true)
echo "${NORMAL:-$(cat "$WORK/normal.out")}"

N=${#SAMPLES[@]}
if [ "$N" -ge 3 ]; then
  FIRST=${SAMPLES[0]}
  THIRD=${SAMPLES[$(( N * 2 / 3 ))]}
  LAST=${SAMPLES[$(( N - 1 ))]}
  VERDICT=$(awk -v a="$THIRD" -v b="$LAST" 'BEGIN { g = (b - a) / a * 100; printf "%s (last third %+.1f%%)", (g < 5 ? "flat" : "growing"), g }')
  echo "result: duration_s=$DURATION_S rate=$HALF keys=$KEYS rss_first_kib=$FIRST rss_two_thirds_kib=$THIRD rss_last_kib=$LAST memory=${VERDICT// /_} normal_p99_us=$(field p99_us "$NORMAL")"
fi
