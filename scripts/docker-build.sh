#!/usr/bin/env bash
# Builds the scratch image `drl:dev` (deploy/Dockerfile) from a statically
# linked release binary built here.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu --bin drl
BIN="$TARGET_DIR/x86_64-unknown-linux-gnu/release/drl"
if ldd "$BIN" >/dev/null 2>&1; then
  echo "error: $BIN is dynamically linked" >&2
  exit 1
fi
mkdir -p deploy/dist/empty
cp "$BIN" deploy/dist/drl
# The release profile keeps line tables for profiling; the image does not need them.
strip deploy/dist/drl 2>/dev/null || true
docker build -t "${IMAGE:-drl:dev}" -f deploy/Dockerfile deploy
