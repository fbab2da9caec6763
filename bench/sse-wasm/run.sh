#!/usr/bin/env bash
# The filter's SSE usage parser in wasm32 under node's V8 (MB/s), and natively for
# comparison (`sse-prof`, the same loop): `bench/sse-wasm/run.sh [seconds]`.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/bench-sse-wasm
cargo build -q --release --lib --target wasm32-unknown-unknown --manifest-path bench/sse-wasm/Cargo.toml --target-dir "$out"
cargo build -q --release --bin sse-prof --manifest-path bench/sse-wasm/Cargo.toml --target-dir "$out"
node bench/sse-wasm/run.mjs "$out/wasm32-unknown-unknown/release/tollgate_bench_sse_wasm.wasm" "${1:-1}"
for mode in 0 1024 16384 65536 prefilter lines; do "$out/release/sse-prof" "${1:-1}" "$mode" | sed 's/^/native: /'; done
