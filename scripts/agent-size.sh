#!/usr/bin/env bash
# The board agent's size and what each crate costs in it:
#
#   scripts/agent-size.sh [TRIPLE]      TRIPLE: aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf
#
# 1. builds `cargo build --profile board -p updraft-agent` (for TRIPLE with scripts/cross.sh)
#    and prints the shipped (stripped) binary's size against the 4.0 MiB goal;
# 2. prints the top 15 crates by the code they put in .text, from cargo-bloat on the same
#    profile with symbols kept (a separate target dir, so the shipped build stays stripped).
#    cargo-bloat is installed when missing (pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
triple="${1:-}"
goal=$((4 * 1024 * 1024))

if [ -n "$triple" ]; then
  scripts/cross.sh "$triple" build --profile board -p updraft-agent >&2
  eval "$(scripts/cross.sh --env "$triple")"
  bin="$CARGO_TARGET_DIR/$triple/board/updraft-agent"
  target_args=(--target "$triple")
else
  cargo build --profile board -p updraft-agent >&2
  bin="${CARGO_TARGET_DIR:-target}/board/updraft-agent"
  target_args=()
fi
size=$(stat -c %s "$bin")
awk -v s="$size" -v g="$goal" -v t="${triple:+, $triple}" 'BEGIN {
  printf "updraft-agent (board profile%s): %d bytes = %.2f MiB (goal <= 4.00 MiB: %s)\n",
    t, s, s / 1048576, (s <= g ? "met" : "missed") }'

command -v cargo-bloat >/dev/null || cargo install cargo-bloat --locked --version 0.12.1 >&2
bloat_dir="${CARGO_TARGET_DIR:-target}/bloat"
echo
CARGO_PROFILE_BOARD_STRIP=false cargo bloat --profile board -p updraft-agent --bin updraft-agent \
  "${target_args[@]}" --target-dir "$bloat_dir" --crates -n 15
