#!/usr/bin/env bash
# Faults on a real 3-node drl cluster in containers (deploy/docker-compose.yml)
# and what they cost: for each phase, hits admitted on a key against its
# limit, and the minority / divergence / overshoot metrics the nodes showed.
#
#   scripts/docker-build.sh                    # the image (PROFILE=debug is enough here)
#   scripts/chaos-compose.sh short             # every phase once, small limits (CI)
#   scripts/chaos-compose.sh long              # longer faults, bigger limits, ROUNDS (3) rounds
#   scripts/chaos-compose.sh healthy partition # chosen phases, in order
#
# Each phase takes a fresh key of the rule `chaos` (LIMIT hits per hour),
# spends it through all three nodes, applies its fault, hammers the key
# through every node it can reach (during the fault and after healing), and
# adds up what was admitted. "beyond" = admitted - LIMIT, the overshoot the
# fault caused; the phase fails when it exceeds the bound (BOUND, default the
# strict policy's in-flight budget: inflight_fraction x LIMIT, at least 1).
# Results go to stdout and to $OUT (tab-separated). Exit status 1 when a
# phase broke its bound or a fault was not seen by the nodes.
#
# A library too: `source scripts/chaos-compose.sh` defines the functions
# below without running anything, so a test can compose its own phases:
#   up; spend KEY NODES...; hammer KEY NODES...; partition NODE; heal NODE;
#   cut_inbound NODE; restart_one NODE; kill_one NODE; restart_all; kill_all;
#   pause_node NODE; unpause_node NODE; metric NODE NAME; run_phase NAME FN; down
# A phase is a function `phase_<name>` that sets ADMITTED (and may set
# NOTE); run_phase wraps it with the fresh key, the bound and the report.
#
# SNAPSHOTS=off runs the same phases with snapshots that do not survive a
# stop (a tmpfs): the control that shows what the snapshot volumes keep.
#
# Needs: docker with docker-compose (v1) or the compose plugin, nsenter
# (util-linux), iptables, curl, and root (nsenter into the containers'
# network namespaces). Talks only to its own containers: every request is
# sent from inside a node's network namespace to its 127.0.0.1:8400.

set -euo pipefail

CHAOS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROJECT=${PROJECT:-drl-chaos}
# A /24 of its own, apart from the default `drl` project's, so both can run.
export DRL_NET=${DRL_NET:-172.30.241}
DRL_BIN=${DRL_BIN:-$CHAOS_ROOT/deploy/dist/drl}
LIMIT=${LIMIT:-1000}
HAMMER=${HAMMER:-2s}
RATE=${RATE:-1500}
FAULT_HOLD=${FAULT_HOLD:-3}
BOUND=${BOUND:-}
OUT=${OUT:-${TMPDIR:-/tmp}/drl-chaos-results.tsv}
NODES=(node-0 node-1 node-2)

log() { printf '[chaos %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- the cluster ----------------------------------------------------------

compose() {
  local -a cmd
  if docker compose version >/dev/null 2>&1; then
    cmd=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    cmd=(docker-compose)
  else
    die "neither 'docker compose' nor docker-compose is installed"
  fi
  # Empty host ports: Docker picks free ones (requests go through the
  # namespaces anyway), so this project never clashes with another.
  local -a files=(-f "$CHAOS_ROOT/deploy/docker-compose.yml")
  [ -z "${CHAOS_OVERRIDE:-}" ] || files+=(-f "$CHAOS_OVERRIDE")
  DRL_HTTP_PORT_0='' DRL_HTTP_PORT_1='' DRL_HTTP_PORT_2='' \
    DRL_GRPC_PORT_0='' DRL_GRPC_PORT_1='' DRL_GRPC_PORT_2='' \
    DRL_RESP_PORT_0='' DRL_RESP_PORT_1='' DRL_RESP_PORT_2='' \
    DRL_RULES_FILE="$CHAOS_RULES" DRL_SNAPSHOT_INTERVAL=1s \
    "${cmd[@]}" -p "$PROJECT" --project-directory "$CHAOS_ROOT/deploy" "${files[@]}" "$@"
}

CHAOS_RULES=${CHAOS_RULES:-}

write_rules() {
  CHAOS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-chaos.XXXXXX")
  CHAOS_RULES="$CHAOS_DIR/rules.toml"
  cat >"$CHAOS_RULES" <<EOF
# The one rule of the chaos runs: a long window, so that a key spent before
# a fault stays spent through it and through restarts.
[[rules]]
name = "chaos"
match = { endpoint = "/chaos", user = "*" }
key = ["user"]
limits = [ { algorithm = "sliding_window", limit = $LIMIT, window = "1h", precision = 60 } ]
EOF
  chmod 0644 "$CHAOS_RULES"
  chmod 0755 "$CHAOS_DIR"
  if [ "${SNAPSHOTS:-on}" = off ]; then
    # The control: snapshots on a tmpfs, which a container loses when it
    # stops, so a restart starts from what the peers remember, if anything.
    CHAOS_OVERRIDE="$CHAOS_DIR/no-snapshots.yml"
    {
      echo "services:"
      for n in "${NODES[@]}"; do
        echo "  $n:"
        echo "    environment: { DRL_SNAPSHOT_PATH: /scratch/snapshot }"
        echo "    tmpfs: [ \"/scratch:uid=65532,gid=65532\" ]"
      done
    } >"$CHAOS_OVERRIDE"
  fi
}

# The container of service NODE (plain docker: compose v1 takes a second to start).
cid() {
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1"
}
node_pid() { docker inspect -f '{{.State.Pid}}' "$(cid "$1")"; }
node_ip() { echo "$DRL_NET.$((10 + ${1#node-}))"; }
network() { echo "${PROJECT//[^a-z0-9_-]/}_drl"; }

# Runs a host command inside NODE's network namespace.
in_node() {
  local node=$1
  shift
  nsenter -t "$(node_pid "$node")" -n -- "$@"
}

http_code() { in_node "$1" curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:8400$2" 2>/dev/null || true; }

wait_ready() {
  local deadline=$((SECONDS + ${READY_TIMEOUT:-90})) node
  for node in "$@"; do
    until [ "$(http_code "$node" /readyz)" = 200 ]; do
      [ $SECONDS -lt $deadline ] || die "$node not ready after ${READY_TIMEOUT:-90}s"
      sleep 0.5
    done
  done
}

# The shipped Compose file serves every protocol out of the box: on each
# node, gRPC answers grpc.health.v1 SERVING (curl over h2c, the protobuf
# reply 08 01) and RESP answers PING with +PONG.
check_protocols() {
  local node reply
  for node in "$@"; do
    reply=$(in_node "$node" sh -c "printf '\\000\\000\\000\\000\\000' | curl -s -m 5 --http2-prior-knowledge \
      -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- \
      http://127.0.0.1:9400/grpc.health.v1.Health/Check | od -An -tx1 | tr -d ' \n'") || true
    [ "$reply" = 00000000020801 ] || die "$node: gRPC health answered '$reply', not SERVING"
    reply=$(in_node "$node" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6380 && printf "*1\r\n\$4\r\nPING\r\n" >&3 && head -c 5 <&3') || true
    [ "$reply" = "+PONG" ] || die "$node: RESP answered '$reply' to PING"
  done
  log "gRPC and RESP answer on every node"
}

# Real clients against the shipped deployment, when they are installed:
# redis-cli sends CL.THROTTLE (3 per minute, redis-cell's parameters) nine
# times round robin over the nodes, and an Envoy RLS client (grpcio, the
# python of DRL_GRPC_PYTHON: a virtualenv with grpcio and xds-protos) sends
# ShouldRateLimit with a limit of 3 per minute nine times: exactly 3
# admitted either way.
check_clients() {
  local i allowed=0 key="compose:cli:$RANDOM$RANDOM" first targets=()
  if command -v redis-cli >/dev/null; then
    for i in 0 1 2 3 4 5 6 7 8; do
      first=$(in_node "${NODES[$((i % 3))]}" redis-cli -p 6380 CL.THROTTLE "$key" 2 3 60 1 | head -n 1) || true
      [ "$first" = 0 ] && allowed=$((allowed + 1))
      sleep 0.03
    done
    [ "$allowed" = 3 ] || die "redis-cli CL.THROTTLE (3 per minute) admitted $allowed of 9 through the nodes"
    log "redis-cli: CL.THROTTLE admitted 3 of 9 through the three nodes"
  else
    log "redis-cli not installed: CL.THROTTLE with a real client not checked"
  fi
  if [ -n "${DRL_GRPC_PYTHON:-}" ]; then
    for i in "${NODES[@]}"; do targets+=("$(node_ip "$i"):9400"); done
    in_node node-0 "$DRL_GRPC_PYTHON" "$CHAOS_ROOT/tests/grpc/rls_smoke.py" "${targets[@]}" >&2 \
      || die "Envoy RLS with a real gRPC client did not admit exactly 3 of 9"
  else
    log "DRL_GRPC_PYTHON not set: Envoy RLS with a real gRPC client not checked"
  fi
}

up() {
  [ -n "$CHAOS_RULES" ] || write_rules
  [ -n "${CHAOS_DIR:-}" ] || CHAOS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/drl-chaos.XXXXXX")
  docker image inspect "${DRL_IMAGE:-drl:dev}" >/dev/null 2>&1 \
    || die "no image ${DRL_IMAGE:-drl:dev}: run scripts/docker-build.sh first"
  [ -x "$DRL_BIN" ] || die "no $DRL_BIN: run scripts/docker-build.sh first"
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  log "starting project $PROJECT on $DRL_NET.0/24"
  compose up -d >/dev/null 2>&1 || { compose up -d; die "compose up failed"; }
  wait_ready "${NODES[@]}"
  log "3 nodes ready"
  check_protocols "${NODES[@]}"
  check_clients
}

down() {
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  [ -z "${CHAOS_DIR:-}" ] || rm -rf "$CHAOS_DIR"
}

# --- load -----------------------------------------------------------------

# Hammers KEY through each NODE (in parallel, from inside each node's
# namespace) for HAMMER (whole seconds: "2s") at RATE/s per node; prints the
# hits admitted. A node whose generator does not finish HANG_GRACE (20) s
# after HAMMER is listed as hung, and the phase fails.
hammer() {
  local key=$1 node total=0 f
  shift
  local -a files=()
  for node in "$@"; do
    f=$(mktemp)
    files+=("$f")
    # A node that leaves requests unanswered would hold the generator past
    # its duration: it gets HANG_GRACE seconds, then counts as hung.
    timeout -k 5 "$(( ${HAMMER%s} + ${HANG_GRACE:-20} ))" \
      nsenter -t "$(node_pid "$node")" -n -- "$DRL_BIN" load --node http://127.0.0.1:8400 \
      --connections 2 --duration "$HAMMER" --rate "$RATE" --keys 1 --user-field caller \
      -f "user=$key" -f endpoint=/chaos >"$f" 2>&1 &
  done
  wait
  local i=0 n detail=''
  for node in "$@"; do
    f=${files[$i]}
    n=$(sed -n 's/^result: .* allowed=\([0-9]*\) .*/\1/p' "$f")
    total=$((total + ${n:-0}))
    if [ -z "$n" ]; then
      n=hung
      echo "$node" >>"$CHAOS_DIR/hung"
    fi
    detail+=" $node=$n"
    rm -f "$f"
    i=$((i + 1))
  done
  log "  $key admitted:$detail"
  echo "$total"
}

# Spends KEY through NODES until a whole round admits nothing (at most
# SPEND_ROUNDS rounds); prints the hits admitted.
spend() {
  local total=0 n _
  for _ in $(seq "${SPEND_ROUNDS:-6}"); do
    n=$(hammer "$@")
    total=$((total + n))
    [ "$n" -gt 0 ] || break
  done
  echo "$total"
}

# --- metrics --------------------------------------------------------------

# The value of metric NAME on NODE (first sample), or "-" if unreachable.
metric() {
  local v
  v=$(in_node "$1" curl -s -m 2 http://127.0.0.1:8400/metrics 2>/dev/null \
    | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { print $2; exit }') || true
  echo "${v:--}"
}

# Samples minority, divergence and overshoot estimate on the reachable nodes
# and keeps the largest values seen in this phase.
sample() {
  local node v
  for node in "$@"; do
    v=$(metric "$node" drl_minority)
    [ "$v" = - ] || SEEN_MINORITY=$(max "$SEEN_MINORITY" "$v")
    v=$(metric "$node" drl_divergence_hits)
    [ "$v" = - ] || SEEN_DIVERGENCE=$(max "$SEEN_DIVERGENCE" "$v")
    v=$(metric "$node" drl_overshoot_estimate_ratio)
    [ "$v" = - ] || SEEN_OVERSHOOT=$(max "$SEEN_OVERSHOOT" "$v")
  done
}

# Waits up to TIMEOUT seconds until metric NAME on NODE compares to VALUE
# with OP (an awk operator: >=, <=, ==); false if it never does.
wait_metric() {
  local node=$1 name=$2 op=$3 value=$4 deadline=$((SECONDS + $5))
  while [ $SECONDS -lt $deadline ]; do
    awk -v m="$(metric "$node" "$name")" -v v="$value" \
      "BEGIN { exit !(m != \"-\" && m + 0 $op v + 0) }" && return 0
    sleep 0.5
  done
  return 1
}

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a + 0 >= b + 0) ? a : b }'; }

# --- faults ---------------------------------------------------------------

partition() {
  log "partition: $1 off the network"
  docker network disconnect -f "$(network)" "$(cid "$1")"
}

heal_partition() {
  log "heal: $1 back on the network"
  docker network connect --ip "$(node_ip "$1")" --alias "$1" "$(network)" "$(cid "$1")"
}

# One-way cut: NODE stops receiving peer traffic (QUIC, UDP 7400) while what
# it sends still arrives.
cut_inbound() {
  log "one-way cut: $1 receives nothing from its peers"
  in_node "$1" iptables -I INPUT -p udp --dport 7400 -j DROP
}

heal_cut() {
  log "heal: $1 receives again"
  in_node "$1" iptables -D INPUT -p udp --dport 7400 -j DROP
}

restart_one() {
  log "restart $1 (SIGTERM, then start)"
  compose restart "$1" >/dev/null 2>&1
  wait_ready "$1"
}

kill_one() {
  log "kill -9 $1, then start"
  docker kill -s KILL "$(cid "$1")" >/dev/null
  compose start "$1" >/dev/null 2>&1
  wait_ready "$1"
}

restart_all() {
  log "restart every node (docker-compose restart)"
  compose restart "${NODES[@]}" >/dev/null 2>&1
  wait_ready "${NODES[@]}"
}

kill_all() {
  log "kill -9 every node, then start them"
  local node
  for node in "${NODES[@]}"; do
    docker kill -s KILL "$(cid "$node")" >/dev/null
  done
  compose start "${NODES[@]}" >/dev/null 2>&1
  wait_ready "${NODES[@]}"
}

pause_node() { log "pause $1 (SIGSTOP)"; docker pause "$(cid "$1")" >/dev/null; }
unpause_node() { log "unpause $1"; docker unpause "$(cid "$1")" >/dev/null; }

# --- phases ---------------------------------------------------------------
# Each reads KEY and sets ADMITTED: every hit admitted on KEY in the phase.

phase_healthy() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_partition() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  partition node-2
  # The fault is in force once the majority's failure detector saw it.
  wait_metric node-0 drl_peers_live '<=' 1 30 || FAULT_UNSEEN="node-0 never lost node-2"
  wait_metric node-2 drl_minority '>=' 1 10 || NOTE+="node-2 did not report drl_minority 1 within 10 s; "
  sleep "$FAULT_HOLD"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
  heal_partition node-2
  wait_ready "${NODES[@]}"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_oneway() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  cut_inbound node-2
  wait_metric node-2 drl_peers_live '<=' 0 30 || FAULT_UNSEEN="node-2 never lost its peers"
  sleep "$FAULT_HOLD"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
  heal_cut node-2
  wait_ready "${NODES[@]}"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_restart_one() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  restart_one node-1
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_restart_all() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  # Let the snapshot writer (every second here) see the spent key.
  sleep 2
  restart_all
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_pause() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  pause_node node-2
  sleep "$FAULT_HOLD"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" node-0 node-1)))
  sample node-0 node-1
  unpause_node node-2
  wait_ready "${NODES[@]}"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

# A partition while the key still has budget left: what the sides admit
# apart, and what node-2 admits when it comes back.
phase_partition_open() {
  local half=$((LIMIT / 2)) saved_rate=$RATE saved_hammer=$HAMMER
  RATE=$((LIMIT / 8)) HAMMER=1s
  ADMITTED=$(hammer "$KEY" "${NODES[@]}")
  RATE=$saved_rate HAMMER=$saved_hammer
  [ "$ADMITTED" -le "$half" ] || NOTE+="spent $ADMITTED before the cut; "
  partition node-2
  wait_metric node-0 drl_peers_live '<=' 1 30 || FAULT_UNSEEN="node-0 never lost node-2"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
  heal_partition node-2
  wait_ready "${NODES[@]}"
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_kill_one() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  kill_one node-1
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

phase_crash_all() {
  ADMITTED=$(spend "$KEY" "${NODES[@]}")
  # A snapshot interval (1 s here) and then some, so the spent key is on disk.
  sleep 2
  kill_all
  ADMITTED=$((ADMITTED + $(hammer "$KEY" "${NODES[@]}")))
  sample "${NODES[@]}"
}

PHASES_SHORT=(healthy partition oneway restart_one restart_all pause)
PHASES_LONG=("${PHASES_SHORT[@]}" partition_open kill_one crash_all)

# Runs phase NAME on a fresh key; appends a row to $OUT; counts failures.
FAILURES=0
ROUND=${ROUND:-1}
run_phase() {
  local name=$1 bound
  KEY="$name-$ROUND-$RANDOM$RANDOM"
  ADMITTED=0 SEEN_MINORITY=0 SEEN_DIVERGENCE=0 SEEN_OVERSHOOT=0 FAULT_UNSEEN='' NOTE=
  bound=${BOUND:-$(awk -v l="$LIMIT" 'BEGIN { b = int(l * 0.02); print (b < 1) ? 1 : b }')}
  log "phase $name (key $KEY)"
  rm -f "$CHAOS_DIR/hung"
  "phase_$name"
  if [ -s "$CHAOS_DIR/hung" ]; then
    FAULT_UNSEEN="requests unanswered $((${HAMMER%s} + ${HANG_GRACE:-20})) s on $(sort -u "$CHAOS_DIR/hung" | tr '\n' ' ')"
  fi
  local beyond=$((ADMITTED - LIMIT)) verdict=ok
  [ "$beyond" -gt 0 ] || beyond=0
  if [ "$beyond" -gt "$bound" ]; then
    verdict="FAIL (bound $bound)"
  elif [ -n "$FAULT_UNSEEN" ]; then
    verdict="FAIL ($FAULT_UNSEEN)"
  fi
  [ "$verdict" = ok ] || FAILURES=$((FAILURES + 1))
  printf '%-12s %6s %8s %7s %9s %11s %10s  %s\n' "$name" "$LIMIT" "$ADMITTED" "$beyond" \
    "$SEEN_MINORITY" "$SEEN_DIVERGENCE" "$SEEN_OVERSHOOT" "$verdict${NOTE:+ -- $NOTE}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$name" "$LIMIT" "$ADMITTED" "$beyond" \
    "$SEEN_MINORITY" "$SEEN_DIVERGENCE" "$SEEN_OVERSHOOT" "$verdict" "$NOTE" >>"$OUT"
}

header() {
  printf '%-12s %6s %8s %7s %9s %11s %10s  %s\n' phase limit admitted beyond minority divergence overshoot verdict
}

main() {
  [ "$(id -u)" = 0 ] || die "needs root (nsenter into the containers' namespaces)"
  local -a phases rounds=(1)
  case "${1:-short}" in
    short) phases=("${PHASES_SHORT[@]}") ;;
    long)
      phases=("${PHASES_LONG[@]}")
      LIMIT=${LIMIT_LONG:-20000} HAMMER=${HAMMER_LONG:-10s} FAULT_HOLD=${FAULT_HOLD_LONG:-30}
      RATE=${RATE_LONG:-3000}
      mapfile -t rounds < <(seq "${ROUNDS:-3}")
      ;;
    *) phases=("$@") ;;
  esac
  printf 'round\tphase\tlimit\tadmitted\tbeyond\tminority\tdivergence\tovershoot\tverdict\tnote\n' >"$OUT"
  trap down EXIT
  trap 'exit 130' INT TERM
  up
  header
  for ROUND in "${rounds[@]}"; do
    for p in "${phases[@]}"; do
      declare -F "phase_$p" >/dev/null || die "no phase '$p' (have: ${PHASES_LONG[*]})"
      run_phase "$p"
    done
  done
  log "results in $OUT"
  if [ "$FAILURES" -gt 0 ]; then
    log "$FAILURES phase(s) failed"
    return 1
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
