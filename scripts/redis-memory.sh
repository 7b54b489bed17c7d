#!/bin/sh
# Bytes per key of a Redis token bucket (the usual Lua script on a hash),
# for comparison with `cargo run --release -p drl-core --example memory_per_key`.
#
#   scripts/redis-memory.sh [KEYS]     (default 1000000; needs redis-server,
#                                       redis-cli and python3)
#
# Starts a throwaway redis-server (no persistence) on port 6390, reads
# `used_memory` from INFO memory, loads KEYS distinct users through EVALSHA
# of the token-bucket script (one request each, as the example does), reads
# it again and prints the growth per key.
set -eu
KEYS=${1:-1000000}
PORT=6390
redis-server --port "$PORT" --save "" --appendonly no --daemonize yes \
  --pidfile /tmp/drl-redis-memory.pid --logfile /tmp/drl-redis-memory.log
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done

SCRIPT='local b = redis.call("HMGET", KEYS[1], "tokens", "ts")
local capacity, rate, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = tonumber(b[1]) or capacity
local ts = tonumber(b[2]) or now
tokens = math.min(capacity, tokens + (now - ts) * rate / 1000)
local allowed = tokens >= cost
if allowed then tokens = tokens - cost end
redis.call("HSET", KEYS[1], "tokens", tokens, "ts", now)
redis.call("PEXPIRE", KEYS[1], math.ceil(capacity / rate * 1000) + 60000)
return allowed and 1 or 0'
SHA=$(redis-cli -p "$PORT" script load "$SCRIPT")
used() { redis-cli -p "$PORT" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
BEFORE=$(used)
python3 - "$KEYS" "$SHA" <<'PY' | redis-cli -p "$PORT" --pipe >/dev/null
import sys, time
n, sha = int(sys.argv[1]), sys.argv[2]
now = str(int(time.time() * 1000))
out = sys.stdout.buffer
def cmd(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)
for i in range(n):
    out.write(cmd("EVALSHA", sha, "1", "user-%08d" % i, "100", "100", now, "1"))
PY
AFTER=$(used)
COUNT=$(redis-cli -p "$PORT" dbsize)
echo "redis $(redis-server --version | cut -d' ' -f3): $COUNT keys, used_memory $BEFORE -> $AFTER B, $(( (AFTER - BEFORE) / COUNT )) B per key"
