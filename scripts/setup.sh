#!/usr/bin/env bash
# Installs what `make test` and `toma demo` need on a fresh machine. Idempotent: a tool that
# is already there at the pinned version is left alone.
set -euo pipefail

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

for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    rustup component add "$c"
  fi
done
