#!/usr/bin/env bash
# Builds the scratch image of deploy/Dockerfile from a statically linked
# `drl` built here (no image is pulled: there is no Rust image to build in).
#
#   scripts/docker-build.sh                  # release build, image drl:dev
#   IMAGE=drl:1.0 scripts/docker-build.sh    # another tag
#   PROFILE=debug scripts/docker-build.sh    # a static debug build (CI: quicker to compile)
#
# Works with any CARGO_TARGET_DIR: the binary's path comes from
# `cargo metadata`. Checks that the binary is static (no ELF interpreter, no
# needed libraries) and that the image runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-drl:dev}
PROFILE=${PROFILE:-release}
TRIPLE=x86_64-unknown-linux-gnu

case "$PROFILE" in
  release) PROFILE_FLAG=(--release); PROFILE_DIR=release ;;
  debug) PROFILE_FLAG=(); PROFILE_DIR=debug ;;
  *) echo "error: PROFILE must be release or debug, not '$PROFILE'" >&2; exit 2 ;;
esac

command -v docker >/dev/null || { echo "error: docker is not installed" >&2; exit 1; }

# An explicit --target keeps build scripts and proc-macros dynamic (they are
# loaded by the host's rustc) while the drl binary links glibc statically.
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  cargo build "${PROFILE_FLAG[@]}" --locked --target "$TRIPLE" --bin drl

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps --locked \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN="$TARGET_DIR/$TRIPLE/$PROFILE_DIR/drl"
[ -x "$BIN" ] || { echo "error: $BIN was not built" >&2; exit 1; }

# A static PIE has neither a PT_INTERP header nor DT_NEEDED entries (ldd's
# wording for it varies between glibc versions, so it is not asked).
if readelf -lW "$BIN" | grep -q 'INTERP' || readelf -dW "$BIN" | grep -q '(NEEDED)'; then
  echo "error: $BIN is dynamically linked; it cannot run in a scratch image" >&2
  readelf -dW "$BIN" | grep '(NEEDED)' >&2 || true
  exit 1
fi

mkdir -p deploy/dist/empty
cp "$BIN" deploy/dist/drl
# Line tables and symbols are for profiling on the host; the image does not need them.
strip deploy/dist/drl
docker build -q -t "$IMAGE" -f deploy/Dockerfile deploy >/dev/null 2>&1 || docker build -t "$IMAGE" -f deploy/Dockerfile deploy
docker run --rm "$IMAGE" --version
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "built $IMAGE ($PROFILE, $(du -h deploy/dist/drl | cut -f1) binary, image $SIZE bytes)"
# docs/http-api.md states the release image's size; say so when a build
# lands more than 10% away from it, so the figure is measured again.
if [ "$PROFILE" = release ]; then
  DOC=$(sed -n 's/.*The release image is [0-9.]* MB (\([0-9,]*\) bytes.*/\1/p' docs/http-api.md | tr -d ,)
  if [ -n "$DOC" ] && { [ "$SIZE" -gt $((DOC * 11 / 10)) ] || [ "$SIZE" -lt $((DOC * 9 / 10)) ]; }; then
    echo "warning: the image is $SIZE bytes; docs/http-api.md says $DOC: measure and update it" >&2
  fi
fi
