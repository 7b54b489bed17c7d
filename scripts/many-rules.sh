#!/usr/bin/env bash
# The many-rules case of the rules work, on real processes: a release
# `drl cluster` of 3 nodes, 3,000 rules that each match every user (one
# sliding-window limit each), 100 users. Prints each node's RSS after the
# first PUT and after 4 more PUTs of the same rules, the time each PUT took,
# and what one keep-alive client gets (decisions/s, p99, denials: with
# limits of 100,000 per hour none may be denied).
#
#   scripts/many-rules.sh            # 3,000 rules
#   RULES=500 scripts/many-rules.sh  # another count
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=${RULES:-3000}
BASE=${BASE_PORT:-18400}
cargo build --release --locked --bin drl >/dev/null
DRL=target/release/drl

dir=$(mktemp -d)
"$DRL" cluster --nodes 3 --dir "$dir" --base-port "$BASE" --peer-base-port $((BASE + 100)) \
  --admin-token tok >"$dir/cluster.log" 2>&1 &
cluster=$!
cleanup() { kill "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

for i in 0 1 2; do
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$((BASE + i))/readyz" >/dev/null && break
    sleep 0.1
  done
done

node_pid() {
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "node --config .*$(basename "$dir")/node-$1.toml"; then
      basename "$p"
      return
    fi
  done
}
rss() {
  local out=""
  for i in 0 1 2; do
    out+="node-$i $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$(node_pid "$i")/status")  "
  done
  echo "$out"
}

rules_text() {
  echo "# put $1"
  for r in $(seq 1 "$RULES"); do
    printf '[[rules]]\nname = "r%d"\nmatch = { user = "*" }\nlimits = [ { algorithm = "sliding_window", limit = 100000, window = "1h" } ]\n\n' "$r"
  done
}

put() {
  rules_text "$1" >"$dir/rules-$1.toml"
  local start end
  start=$(date +%s%N)
  if ! curl -sS --fail-with-body -X PUT -H "Authorization: Bearer tok" --data-binary "@$dir/rules-$1.toml" \
    "http://127.0.0.1:$BASE/v1/rules" -o "$dir/put-$1.json"; then
    cat "$dir/put-$1.json"; echo
    return 1
  fi
  end=$(date +%s%N)
  echo "PUT $1 of $RULES rules: $(((end - start) / 1000000)) ms"
}

load() {
  "$DRL" load --node "http://127.0.0.1:$BASE" --connections 1 --keys 100 --duration "${DURATION:-10s}" |
    grep '^result:'
}

echo "before any PUT: $(rss)"
put 1
load
echo "after the first PUT and 100 users: $(rss)"
for n in 2 3 4 5; do
  put "$n"
done
load
echo "after 4 more PUTs: $(rss)"
