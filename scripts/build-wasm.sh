#!/usr/bin/env bash
# Builds the filter for wasm32-wasip1 (rustup target, or Debian's rustc-web fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
build() {
  if [ -f .local/wasm-fallback ]; then
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_WASIP1_LINKER=wasm-ld-19 \
      RUSTFLAGS="-L /usr/lib/wasm32-wasi -C link-self-contained=no" \
      /usr/bin/cargo build --release --target wasm32-wasip1 -p tollgate-filter -Zbuild-std=std,panic_abort "$@"
  else
    cargo build --release --target wasm32-wasip1 -p tollgate-filter "$@"
  fi
}
out=target/wasm32-wasip1/release
# The test-only module first (it can trap on purpose: FAIL_RELOAD test), then the real
# one, so tollgate_filter.wasm is always the build without the feature.
build --features test-trap
cp "$out/tollgate_filter.wasm" "$out/tollgate_filter_test_trap.wasm"
build
ls -l "$out/tollgate_filter.wasm" "$out/tollgate_filter_test_trap.wasm"
