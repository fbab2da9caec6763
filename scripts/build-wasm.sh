#!/usr/bin/env bash
# Builds the filter for wasm32-wasip1 (rustup target, or Debian's rustc-web fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .local/wasm-fallback ]; then
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_WASIP1_LINKER=wasm-ld-19 \
    RUSTFLAGS="-L /usr/lib/wasm32-wasi -C link-self-contained=no" \
    /usr/bin/cargo build --release --target wasm32-wasip1 -p tollgate-filter -Zbuild-std=std,panic_abort
else
  cargo build --release --target wasm32-wasip1 -p tollgate-filter
fi
ls -l target/wasm32-wasip1/release/tollgate_filter.wasm
