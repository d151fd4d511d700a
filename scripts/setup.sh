#!/usr/bin/env bash
# Installs what `make test` and `toma demo` need on a fresh machine. Idempotent: a tool that
# is already there at the pinned version is left alone.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
NEXTEST_VERSION=0.9.151

have() { command -v "$1" >/dev/null 2>&1; }

if ! have cargo; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

if ! cargo nextest --version 2>/dev/null | grep -q "cargo-nextest $NEXTEST_VERSION"; then
  echo "setup: installing cargo-nextest $NEXTEST_VERSION (once)"
  cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked
fi

# The e2e harness (e2e/harness) generates certificates with openssl, polls with curl, picks
# free ports with ss (iproute2); iptables is for network-fault tests. Go builds the e2e tools.
# `toma bench` and the NBD tests drive fio (its `nbd` engine is libnbd-based), qemu-nbd/qemu-img
# (qemu-utils) and nbdinfo (libnbd-bin).
apt_missing=()
for p in openssl curl iproute2 iptables fio qemu-utils libnbd-bin; do
  dpkg -s "$p" >/dev/null 2>&1 || apt_missing+=("$p")
done
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "setup: installing ${apt_missing[*]} (apt, once)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
# The CSI node plugin and its e2e tests: FUSE (fuse3), loop devices and blkid (util-linux),
# mkfs.ext4 (e2fsprogs), mkfs.xfs (xfsprogs).
csi_missing=()
for p in fuse3 util-linux e2fsprogs xfsprogs; do
  dpkg -s "$p" >/dev/null 2>&1 || csi_missing+=("$p")
done
if [ ${#csi_missing[@]} -gt 0 ]; then
  echo "setup: installing ${csi_missing[*]} (apt, once)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${csi_missing[@]}" >/dev/null
fi
if ! have go && [ ! -x /usr/local/go/bin/go ]; then
  echo "setup: go not found; the e2e tools (e2e/tools/build.sh) need Go >= 1.26" >&2
  exit 1
fi

for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    rustup component add "$c"
  fi
done

# `make fuzz` (part of `make test`) runs cargo-fuzz, which needs a nightly toolchain.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "setup: installing the nightly toolchain (once), for cargo-fuzz"
  rustup toolchain install nightly --profile minimal
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION (once)"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
