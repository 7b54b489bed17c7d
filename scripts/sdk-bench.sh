#!/usr/bin/env bash
# Measures the client SDK against a real 3-node `drl cluster` that the
# benchmark starts, kills nodes of and stops itself (client/examples/sdk_bench.rs):
# gRPC batches of 10 at half the client's peak rate, single checks over
# gRPC and HTTP, failover under kill -9 of the nearest node, and each
# degraded mode through a 10 s full-cluster outage. Figures: docs/report.md,
# "Client SDK". Ports 16400-19402 must be free.
#
#   scripts/sdk-bench.sh                 # every phase
#   PHASES=batch,single scripts/sdk-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin drl
cargo build --release -p drl-client --example sdk_bench
DRL_BIN=target/release/drl target/release/examples/sdk_bench
