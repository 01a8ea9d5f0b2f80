#!/usr/bin/env bash
# Checks Updraft for one ARM target the way CI does, under qemu-user:
#
#   scripts/cross-check.sh aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf
#
# 1. builds the agent (and for aarch64 the daemon) for TRIPLE with scripts/cross.sh;
# 2. runs the unit tests of updraft-shared and updraft-agent for TRIPLE under qemu;
# 3. runs tests/cross_agent.rs: that agent against this machine's daemon over QUIC;
# 4. packages them as .debs (Architecture arm64 / armhf) and passes them through lintian.
#
# The cross builds use the dev profile (tests, not size; the board profile's figures come
# from `scripts/cross.sh TRIPLE build --profile board -p updraft-agent`).
set -euo pipefail
cd "$(dirname "$0")/.."
triple="${1:?usage: scripts/cross-check.sh TRIPLE}"
case "$triple" in
aarch64-unknown-linux-gnu) arch=arm64 packages=(updraft-agent updraft-daemon) ;;
armv7-unknown-linux-gnueabihf) arch=armhf packages=(updraft-agent) ;;
*) echo "cross-check.sh: unknown target '$triple'" >&2 && exit 1 ;;
esac
step() { echo "== cross-check $triple: $*" >&2; }

step "build"
for p in "${packages[@]}"; do
  scripts/cross.sh "$triple" build -p "$p"
done
eval "$(scripts/cross.sh --env "$triple")"
case "$CARGO_TARGET_DIR" in
/*) agent="$CARGO_TARGET_DIR/$triple/debug/updraft-agent" ;;
*) agent="$PWD/$CARGO_TARGET_DIR/$triple/debug/updraft-agent" ;;
esac

step "unit tests under qemu"
scripts/cross.sh "$triple" test -p updraft-shared -p updraft-agent --lib

step "the $triple agent against this machine's daemon"
(
  # The test itself and the daemon are this machine's: the default toolchain and target dir.
  unset RUSTC RUSTDOC CARGO_TARGET_DIR
  UPDRAFT_TEST_AGENT="$agent" UPDRAFT_CROSS_TEST=require cargo test --test cross_agent
)

step "packages"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for p in "${packages[@]}"; do
  scripts/cross.sh "$triple" deb -p "$p" --no-build --profile dev --output "$out" >/dev/null
done
for deb in "$out"/*.deb; do
  got="$(dpkg-deb -f "$deb" Architecture)"
  [ "$got" = "$arch" ] || { echo "$deb: Architecture is $got, not $arch" >&2 && exit 1; }
  # Debug builds carry symbols and a long build id path: only errors count here.
  if lintian --no-tag-display-limit "$deb" | grep '^E:'; then
    echo "$deb: lintian reports errors (above)" >&2
    exit 1
  fi
  echo "$(basename "$deb"): Architecture $got, lintian: no errors" >&2
done
step "ok"
