#!/usr/bin/env bash
# Builds the empty Proxy-Wasm filter used as the "any Wasm filter" baseline variant
# (bench/noop-filter), the same way scripts/build-wasm.sh builds Tollgate.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-noop
if [ -f .local/wasm-fallback ]; then
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_WASIP1_LINKER=wasm-ld-19 \
    RUSTFLAGS="-L /usr/lib/wasm32-wasi -C link-self-contained=no" \
    /usr/bin/cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml \
      --target-dir "$out" -Zbuild-std=std,panic_abort
else
  cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml --target-dir "$out"
fi
ls -l "$out/wasm32-wasip1/release/tollgate_bench_noop_filter.wasm"
