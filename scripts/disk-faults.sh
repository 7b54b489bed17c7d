#!/usr/bin/env bash
# Disk faults under load, on real `drl node` processes (release build;
# needs root: it mounts a small tmpfs). Three nodes over QUIC on loopback,
# `durability = "interval"`, a snapshot every 2 s; node 0 keeps its
# snapshot and journal on a 2 MiB tmpfs. While `drl load` spends keys
# through every node:
#
#   full   — a file fills the tmpfs: node 0's journal writes fail
#   freed  — the file is removed
#   ro     — the directory turns read-only (a read-only bind mount over it)
#   rw     — and writable again
#
# For each phase it prints node 0's decisions in the phase (they must go
# on), its /readyz status and `durability_degraded` reason, and
# drl_durability_degraded. Then every node is killed with SIGKILL and
# started again: node 0 must replay its journal without refusing a
# segment or its snapshot (a torn tail may be cut), and be ready.
#
# Usage: scripts/disk-faults.sh
# Environment: PHASE_SECONDS (4), BASE_PORT (18700), CARGO_TARGET_DIR, DRL
# (a release binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "needs root (mounts a tmpfs)" >&2; exit 1; }
PHASE_SECONDS=${PHASE_SECONDS:-4}
BASE_PORT=${BASE_PORT:-18700}
TARGET=${CARGO_TARGET_DIR:-target}
N=3

if [ -z "${DRL:-}" ]; then
  echo "== building (release)"
  cargo build --release --bin drl
  DRL=$TARGET/release/drl
fi
DRL=$(realpath "$DRL")

DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-disk-faults.XXXXXX")
MNT=$DIR/data0
declare -a PIDS=()
LOAD_PID=""
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for log in "$DIR"/node-*.log; do [ -f "$log" ] && { echo "--- $log"; tail -5 "$log"; }; done
  fi
  [ -z "$LOAD_PID" ] || kill -9 "$LOAD_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  while mountpoint -q "$MNT"; do umount "$MNT" || break; done
  rm -rf "$DIR"
}
trap cleanup EXIT

http_port() { echo $((BASE_PORT + $1)); }
peer_port() { echo $((BASE_PORT + 20 + $1)); }

"$DRL" certs --dir "$DIR/certs" --nodes $N >/dev/null
cat >"$DIR/rules.toml" <<'RULES'
[[rules]]
name = "per-key"
match = { user = "*" }
limits = [ { algorithm = "fixed_window", limit = 100000000, window = "1m" },
           { algorithm = "sliding_window", limit = 100000000, window = "1h" } ]
RULES
mkdir -p "$MNT"
mount -t tmpfs -o size=2m tmpfs "$MNT"
for slot in $(seq 0 $((N - 1))); do
  seeds=$(for s in $(seq 0 $((N - 1))); do [ "$s" = "$slot" ] || printf '"127.0.0.1:%s", ' "$(peer_port "$s")"; done)
  cat >"$DIR/node-$slot.toml" <<CONF
name = "node-$slot"
slot = $slot
cluster_size = $N
listen_peer = "127.0.0.1:$(peer_port "$slot")"
listen_http = "127.0.0.1:$(http_port "$slot")"
seeds = [${seeds%, }]
discovery_interval = "200ms"
recovery_timeout = "1s"
rules = "rules.toml"
snapshot_path = "data$slot/node-$slot.snapshot"
snapshot_interval = "2s"
durability = "interval"
tls_ca = "certs/ca.pem"
tls_cert = "certs/node-$slot.pem"
tls_key = "certs/node-$slot-key.pem"
key_seed = "000102030405060708090a0b0c0d0e0f"
CONF
done

start_all() {
  for slot in $(seq 0 $((N - 1))); do
    (cd "$DIR" && RUST_LOG=info exec "$DRL" node --config "node-$slot.toml" >>"node-$slot.log" 2>&1) &
    PIDS[slot]=$!
  done
  for slot in $(seq 0 $((N - 1))); do
    for _ in $(seq 1 300); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(http_port "$slot")/readyz")" = 200 ] && break
      sleep 0.1
    done
  done
}

metric() { # metric NAME: node 0's value (summed over labels)
  curl -s "http://127.0.0.1:$(http_port 0)/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

phase() { # phase NAME
  local before after url code degraded
  before=$(metric drl_decisions_total)
  sleep "$PHASE_SECONDS"
  after=$(metric drl_decisions_total)
  url="http://127.0.0.1:$(http_port 0)/readyz"
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  degraded=$(curl -s "$url" | grep -o '"durability_degraded":\("[^"]*"\|null\)' | cut -d: -f2-)
  printf '%-7s decisions on node 0: %6d | readyz %s, degraded: %s | drl_durability_degraded %s | write errors %s\n' \
    "$1" "$((after - before))" "$code" "$degraded" \
    "$(metric drl_durability_degraded)" "$(metric drl_journal_write_errors_total)"
}

start_all
URLS=$(for s in $(seq 0 $((N - 1))); do printf 'http://127.0.0.1:%s,' "$(http_port "$s")"; done)
"$DRL" load --node "${URLS%,}" --connections 12 --duration "$((PHASE_SECONDS * 6))s" --keys 2000 --rate 3000 \
  >"$DIR/load.log" 2>&1 &
LOAD_PID=$!
sleep 1
phase healthy
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null || true
phase full
rm -f "$MNT/filler"
phase freed
# Read-only: a read-only bind mount over the directory (a plain remount is
# refused while the journal's segment is open for writing). What is
# already open stays writable; the next segment (after the next snapshot)
# and the snapshot itself are refused.
mount --bind "$MNT" "$MNT"
mount -o remount,bind,ro "$MNT"
phase ro
umount "$MNT"
phase rw
sleep 1
echo "== kill -9 of every node, restart"
for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
kill -9 "$LOAD_PID" 2>/dev/null || true
wait 2>/dev/null || true
LOAD_PID=""
PIDS=()
start_all
ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(http_port 0)/readyz")
echo "node 0 ready after the restart: $ready"
grep -E "journal (replayed|tail cut|segment)|snapshot (merged|refused)" "$DIR/node-0.log" | tail -5
refused=$(grep -cE "journal segment refused|snapshot refused" "$DIR/node-0.log" || true)
echo "segments or snapshots refused: $refused"
[ "$ready" = 200 ] && [ "$refused" = 0 ]
