#!/usr/bin/env bash
# Builds, tests and packages Updraft for ARM boards from an x86_64 Debian 12 machine.
#
#   scripts/cross.sh TRIPLE CARGO-COMMAND [ARGS...]   runs `cargo CARGO-COMMAND --target TRIPLE ARGS...`
#   scripts/cross.sh --setup                          only installs and fetches what is needed
#   scripts/cross.sh --env TRIPLE                     prints the environment it would use
#
#   TRIPLE: aarch64-unknown-linux-gnu (64-bit boards, ARM cloud machines)
#           armv7-unknown-linux-gnueabihf (32-bit boards)
#
# Examples:
#   scripts/cross.sh aarch64-unknown-linux-gnu build --profile board -p updraft-agent
#   scripts/cross.sh armv7-unknown-linux-gnueabihf test -p updraft-agent --lib   # runs under qemu
#   scripts/cross.sh armv7-unknown-linux-gnueabihf deb -p updraft-agent --profile board
#
# The compiler is Debian's rustc-web with the standard library for each target from
# Debian's libstd-rust-web-dev (Multi-Arch: same). Debian 12's own rustc-web (1.85) is older
# than the workspace's dependencies need, so the script takes the one from Debian 13
# (trixie): debfetch.py fetches it with its libraries, checks every file against the
# archive's signed index, and unpacks it into a private root ($UPDRAFT_CROSS_HOME, default
# ~/.cache/updraft-cross); the compiler runs through that root's own dynamic loader, so
# nothing on the system changes. Linking uses Debian 12's cross gcc and libc, so the
# binaries need glibc 2.34 or newer on the board (Debian 12, Raspberry Pi OS 12, Ubuntu 22.04).
# Host packages (cross gcc, cross libc, qemu-user) are installed with apt-get when missing.
# Output goes to $CARGO_TARGET_DIR, default target/cross.
set -euo pipefail

SUITE=trixie
readonly SUITE
HOST_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
  libc6-dev-armhf-cross qemu-user qemu-user-static binfmt-support gpgv python3
  debian-archive-keyring)
here="$(cd "$(dirname "$0")" && pwd)"
home="${UPDRAFT_CROSS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/updraft-cross}"
root="$home/rust-web-$SUITE"

die() {
  echo "cross.sh: $*" >&2
  exit 1
}

host_packages() {
  local missing=()
  for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ]; then
    die "missing Debian packages: ${missing[*]} (as root: apt-get install -y ${missing[*]})"
  fi
  echo "cross.sh: installing ${missing[*]}" >&2
  apt-get update -qq || true
  apt-get install -y -qq "${missing[@]}" >/dev/null ||
    die "apt-get could not install: ${missing[*]}"
}

toolchain() {
  [ "$(dpkg --print-architecture)" = amd64 ] ||
    die "cross builds run on an amd64 (x86_64) build machine; this one is $(dpkg --print-architecture)"
  if [ ! -x "$root/usr/bin/rustc" ] || [ ! -e "$root/.complete" ]; then
    echo "cross.sh: fetching rustc-web and the arm64/armhf standard libraries from Debian $SUITE into $root" >&2
    rm -rf "$root"
    mkdir -p "$home"
    # Host packages follow their dependencies; the targets' standard libraries (rlibs) are
    # taken alone. gcc, libc-dev and binutils come from the host.
    python3 "$here/debfetch.py" "$root" "$SUITE" amd64:rustc-web \
      =arm64:libstd-rust-web-dev =armhf:libstd-rust-web-dev \
      --skip gcc libc-dev binutils c-compiler clang >"$home/fetch-$SUITE.log" ||
      die "could not fetch the toolchain (log: $home/fetch-$SUITE.log)"
    for tool in rustc rustdoc; do
      cat >"$root/$tool" <<EOF
#!/bin/sh
# Debian $SUITE's $tool, run through its own loader and libraries (see scripts/cross.sh).
exec "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" "$root/usr/bin/$tool" --sysroot "$root/usr" "\$@"
EOF
      chmod +x "$root/$tool"
    done
    "$root/rustc" -vV >/dev/null || die "the fetched rustc does not run: remove $root and try again"
    touch "$root/.complete"
  fi
}

# Lets the kernel start ARM programs through qemu (binfmt_misc), so that an ARM program
# (a test, the agent) can start another one; QEMU_LD_PREFIX then finds their libraries.
binfmt() {
  local dir=/proc/sys/fs/binfmt_misc
  [ -e "$dir/$1" ] && return
  [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
    die "cannot mount $dir (as root: mount -t binfmt_misc binfmt_misc $dir)"
  update-binfmts --enable "$1" >/dev/null 2>&1 || true
  # systemd-binfmt's file for it is the very line the kernel takes.
  [ -e "$dir/$1" ] || cat "/usr/lib/binfmt.d/$1.conf" >"$dir/register" 2>/dev/null || true
  [ -e "$dir/$1" ] ||
    die "cannot register $1 with binfmt_misc (as root: update-binfmts --enable $1)"
}

# Prints the environment for TRIPLE.
environment() {
  local triple="$1" gnu qemu upper
  case "$triple" in
  aarch64-unknown-linux-gnu) gnu=aarch64-linux-gnu qemu=qemu-aarch64 ;;
  armv7-unknown-linux-gnueabihf) gnu=arm-linux-gnueabihf qemu=qemu-arm ;;
  *) die "unknown target '$triple': use aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" ;;
  esac
  [ -d "$root/usr/lib/rustlib/$triple/lib" ] ||
    die "no standard library for $triple in $root: remove $root and run scripts/cross.sh --setup"
  # qemu's -L prefix: the cross libc, and an empty ld.so.cache so that the guest's loader
  # never reads the host's, which lists the host's own armhf/arm64 libraries when any are
  # installed (Multi-Arch) and mixing those with the cross libc crashes in pthread_create.
  local prefix="$home/qemu-$gnu"
  if [ ! -e "$prefix/etc/ld.so.cache" ]; then
    mkdir -p "$prefix/etc" "$prefix/usr"
    ln -sfn "/usr/$gnu/lib" "$prefix/lib"
    ln -sfn "/usr/$gnu/lib" "$prefix/usr/lib"
    : >"$prefix/etc/ld.so.cache"
  fi
  binfmt "$qemu"
  upper="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
  local lower="${triple//-/_}"
  cat <<EOF
export RUSTC="$root/rustc"
export RUSTDOC="$root/rustdoc"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cross}"
export CARGO_TARGET_${upper}_LINKER="$gnu-gcc"
export CARGO_TARGET_${upper}_RUNNER="$qemu -L $prefix"
export CC_${lower}="$gnu-gcc"
export AR_${lower}="$gnu-ar"
export QEMU_LD_PREFIX="$prefix"
EOF
}

case "${1:-}" in
--setup)
  host_packages
  toolchain
  "$root/rustc" -V
  ;;
--env)
  [ $# -eq 2 ] || die "usage: scripts/cross.sh --env TRIPLE"
  host_packages
  toolchain
  env_text="$(environment "$2")"
  echo "$env_text"
  ;;
"" | -h | --help)
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  ;;
*)
  [ $# -ge 2 ] || die "usage: scripts/cross.sh TRIPLE CARGO-COMMAND [ARGS...]"
  triple="$1" command="$2"
  shift 2
  host_packages
  toolchain
  env_text="$(environment "$triple")"
  eval "$env_text"
  cd "$here/.."
  exec cargo "$command" --target "$triple" "$@"
  ;;
esac
