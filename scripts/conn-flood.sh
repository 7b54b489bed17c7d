#!/usr/bin/env bash
# A connection flood against one node, and the latency a normal client and
# the readiness probe see meanwhile (issue: hostile clients).
#
#   scripts/conn-flood.sh                 # release build, 10,000 connections
#   FLOOD=2000 scripts/conn-flood.sh      # smaller
#
# Starts `drl node` (decision port and a separate operations port) on
# loopback, then `examples/conn_flood.rs`: FLOOD connections from SOURCES
# loopback addresses (127.0.1.x), half idle and half slowloris, reopened
# as the node closes them; meanwhile REQUESTS checks over keep-alive, a
# tenth as many over new connections, and as many probes of /readyz on the
# operations port. Prints p50/p99/max of each and a `result:` line.
#
# Knobs (environment): FLOOD (10000), SOURCES (20), REQUESTS (2000),
# SETTLE_S (5), PORT (18600; the operations port is PORT+1, the peer port
# PORT+2), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-18600}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

echo "== building (release)"
cargo build --release --bin drl --example conn_flood
DRL="$TARGET_DIR/release/drl"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drl-flood.XXXXXX")
NODE_PID=""
cleanup() {
  [ -n "$NODE_PID" ] && kill -TERM "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# The node holds one descriptor per connection: give it room.
ulimit -n "$(ulimit -Hn)"

"$DRL" certs --dir "$WORK/certs" --nodes 1 >/dev/null
cat > "$WORK/rules.toml" <<'RULES'
[[rules]]
name = "per-user"
match = { user = "*" }
key = ["user"]
limits = [ { algorithm = "token_bucket", capacity = 1000, refill = 1000, per = "1s" } ]
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
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$((PORT + 1))/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "== flood"
TARGET="127.0.0.1:$PORT" ADMIN="127.0.0.1:$((PORT + 1))" \
  "$TARGET_DIR/release/examples/conn_flood"
