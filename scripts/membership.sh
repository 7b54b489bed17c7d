#!/usr/bin/env bash
# Elastic membership on real processes, release build: a cluster of 3
# `drl node` processes (QUIC on loopback, no cluster size configured) grows
# one node at a time to NODES, then shrinks back to 3 (every third removal
# a kill -9, the others clean stops), while a key whose hourly limit was
# spent before the first change is hammered through every running node and
# a fresh 5-per-minute limit is asked 20 times round-robin after each change.
#
# Printed per change: how long until every running node counts the new
# membership, what the spent key gained, and the small limit's admissions
# (exactly 5 is exact); at the end, the spent key's total gain against the
# in-flight bound.
#
# Usage: scripts/membership.sh            # to 10 nodes
#        NODES=6 scripts/membership.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-10}
DRL_MEMBERSHIP_NODES=$NODES cargo test --release --locked --test membership_processes -- --nocapture 2>&1 \
  | grep -E "^(join|stop|kill) |^alice:|test result|panicked|assert"
